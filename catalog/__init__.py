"""What is in the catalog and where: walking, grouping, harvesting, registering."""
