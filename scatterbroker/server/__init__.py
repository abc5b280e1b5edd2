"""The server: who runs it is the facility.

The app factory (:mod:`.app`: ``build_app``, ``local_config``,
``serve_in_thread``), the fast data route (:mod:`.fastpath`), the read caches
(:mod:`.response_cache`, :mod:`.entry_cache`, :mod:`.write_log`), the access
policy and API keys (:mod:`.access`, :mod:`.keys`), the jobs API
(:mod:`.jobs_api`, :mod:`.job_inputs`, :mod:`.job_records`), the catalog's
write guard (:mod:`.guard`) and the pieces that replace parts of Tiled's
request path for speed (:mod:`.tiled_layers`, :mod:`.request_overhead`,
:mod:`.sqlite_reads`, :mod:`.streaming`, :mod:`.compression`).

Layers: the server imports ``catalog``, ``adapters``, ``reduction`` and the
core modules; nothing below it imports the server.
"""
