"""NeXpy plugin: a "Catalog" menu to open catalog nodes and register files.

Installed with ``pip install "scatterbroker[nexpy]"``; NeXpy finds it through
the entry point ``nexpy.plugins`` (``catalog = scatterbroker.clients.nexpy_plugin:plugin_menu``)
and lists it under File > Manage Plugins, where it is switched on once (or
put ``scatterbroker.clients.nexpy_plugin = 1`` under ``[plugins]`` in
``~/.nexpy/settings.ini``). The menu has:

* **Open from catalog…**: server URL and API key, a tree of the catalog that
  expands as you browse, a search box over node metadata
  (``sample.temperature > 200 and sample.name == s1``; plain words search the
  full text), and *Open*, which loads the selected node into NeXpy's tree as an
  ``NXroot``: groups, attributes and small fields at once, every large field a
  :class:`~scatterbroker.clients.nexus.RemoteField` that reads only the slices NeXpy
  plots (directly from the file when the server's file is reachable here).
* **Open portable wrapper…**: a wrapper file whose large fields read through
  their global URIs when their external links do not resolve here
  (:func:`scatterbroker.clients.nexus.nxload`; NeXpy's own File > Open shows them as
  broken links).
* **Register current file**: uploads the tree selected in NeXpy (its file, or
  the tree saved to a temporary file) as a new catalog node, with links kept
  as links (:func:`scatterbroker.clients.upload.upload`).

The logic without Qt (:class:`CatalogSession`, :func:`parse_query`,
:func:`tree_name`) is importable without NeXpy; the dialogs are built on first
use. Errors show in the dialog's status line, never in a modal box.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

__all__ = ["plugin_menu", "CatalogSession", "Row", "parse_query", "tree_name",
           "open_catalog", "open_wrapper", "register_current", "add_to_nexpy"]

MENU = "Catalog"
#: children listed per node in the browser
LIST_LIMIT = int(os.getenv("SCATTERBROKER_NEXPY_LIST_LIMIT") or 500)
#: remembered for the session only (the API key is never written to disk)
_last: dict[str, str] = {"url": os.environ.get("SCATTERBROKER_URL", "http://127.0.0.1:8000"),
                         "api_key": os.environ.get("SCATTERBROKER_API_KEY", ""),
                         "node": ""}


def plugin_menu() -> tuple[str, list[tuple[str, Callable[..., Any]]]]:
    """NeXpy's plugin hook: the menu name and its ``(label, callable)`` actions."""
    return MENU, [
        ("Open from catalog…", open_catalog),
        ("Open portable wrapper…", open_wrapper),
        ("Register current file", register_current),
    ]


# ------------------------------------------------------------- without Qt


_TERM = re.compile(r"^\s*([^\s=!<>~]+)\s*(==|!=|>=|<=|=|>|<|~)\s*(.+?)\s*$")


def parse_query(text: str) -> list[Any]:
    """Tiled queries for a search box: ``key op value`` terms joined by ``and``.

    Operators ``==`` (or ``=``), ``!=``, ``>``, ``>=``, ``<``, ``<=``, and ``~``
    (regular expression). Keys are metadata paths with ``.`` or ``/``
    (``sample/temperature``); values are JSON when they parse (numbers,
    ``true``) else text. A term without an operator searches the full text.

    Examples
    --------
    >>> queries = parse_query("sample/temperature > 200 and sample.name == s1")
    >>> [(type(q).__name__, q.key, q.value) for q in queries]
    [('Comparison', 'sample.temperature', 200), ('Eq', 'sample.name', 's1')]
    """
    from tiled.queries import Comparison, Eq, FullText, NotEq, Regex

    queries: list[Any] = []
    for term in re.split(r"\s+and\s+|;", text.strip(), flags=re.IGNORECASE):
        if not term.strip():
            continue
        match = _TERM.match(term)
        if match is None:
            queries.append(FullText(term.strip()))
            continue
        key, op, raw = match.groups()
        key = key.replace("/", ".").strip(".")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw.strip("'\"")
        if op in ("==", "="):
            queries.append(Eq(key, value))
        elif op == "!=":
            queries.append(NotEq(key, value))
        elif op == "~":
            queries.append(Regex(key, str(value)))
        else:
            queries.append(Comparison({">": "gt", ">=": "ge", "<": "lt", "<=": "le"}[op], key, value))
    return queries


def tree_name(key: str, taken: Any = ()) -> str:
    """A Python name for a tree in NeXpy's shell, unique among ``taken``.

    Examples
    --------
    >>> tree_name("scan-1.nxs", {"scan_1_nxs"})
    'scan_1_nxs_1'
    """
    name = re.sub(r"\W", "_", key or "catalog") or "catalog"
    if name[0].isdigit():
        name = f"n{name}"
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


@dataclass(frozen=True)
class Row:
    """One catalog node as the browser lists it."""

    key: str
    path: str
    family: str
    detail: str
    uri: str

    @property
    def expandable(self) -> bool:
        return self.family == "container"


class CatalogSession:
    """A connection to one server: browse, search, load and register nodes.

    Parameters
    ----------
    url
        Server URL, or any node's global URI on it.
    api_key
        Also registered with :func:`scatterbroker.clients.nexus.set_api_key`, so the
        lazily read fields of loaded trees use it.
    """

    def __init__(self, url: str, api_key: str | None = None) -> None:
        from scatterbroker.clients.nexus import _connect, set_api_key, split_uri

        self.base, self.start = split_uri(url.strip())
        if not self.base.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL")
        self.api_key = api_key or None
        set_api_key(self.base, self.api_key)
        self.client = _connect(f"{self.base}/api/v1/", self.api_key, cache=False)

    def node(self, path: str = "") -> Any:
        path = path.strip("/")
        return self.client[path] if path else self.client

    def children(self, path: str = "", query: str = "") -> list[Row]:
        """The children of ``path`` (those matching ``query``, see :func:`parse_query`)."""
        from scatterbroker.catalog.uris import global_uri

        node = self.node(path)
        if getattr(node.structure_family, "value", node.structure_family) != "container":
            return []
        for q in parse_query(query) if query else []:
            node = node.search(q)
        rows = []
        for key, child in islice(node.items(), LIST_LIMIT):
            family = getattr(child.structure_family, "value", child.structure_family)
            specs = ",".join(s.name for s in child.specs or [])
            if family == "array":
                detail = f"{tuple(child.shape)} {child.dtype}"
            elif family == "container":
                detail = specs
            else:
                detail = family
            if family == "array" and specs and specs != "sb-array":
                detail = f"{specs} {detail}"
            rows.append(Row(key, f"{path.strip('/')}/{key}".strip("/"), family, detail,
                            global_uri(child)))
        return rows

    def uri(self, path: str) -> str:
        from scatterbroker.clients.nexus import node_uri

        return node_uri(self.base, path)

    def load(self, path: str, *, local: bool = True) -> Any:
        """The node at ``path`` as an NXroot (or NXfield), large fields lazy."""
        from scatterbroker.clients.nexus import load_remote

        return load_remote(self.uri(path), api_key=self.api_key, local=local)

    def register(self, source: Any, path: str) -> Any:
        """Upload ``source`` (a NeXus file, or an NXroot) as the new node ``path``."""
        from scatterbroker.clients.upload import upload

        file, tmp = _as_file(source)
        try:
            return upload(file, self.uri(path), api_key=self.api_key)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def _as_file(source: Any) -> tuple[Path, Path | None]:
    """A NeXus file holding ``source``: its own file, or a temporary copy."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source), None
    root = source.nxroot
    filename = getattr(root, "nxfilename", None)
    if filename and Path(filename).is_file() and root.nxfilemode in ("r", "rw"):
        return Path(filename), None
    from copy import deepcopy

    fd, name = tempfile.mkstemp(suffix=".nxs", prefix=f"{root.nxname}-")
    os.close(fd)
    os.unlink(name)
    deepcopy(root).save(name)
    return Path(name), Path(name)


def add_to_nexpy(root: Any, key: str, mainwindow: Any = None) -> str:
    """Put ``root`` into NeXpy's tree (under a fresh name from ``key``) and select it."""
    from nexusformat.nexus import NXentry, NXfield, NXroot

    if mainwindow is None:
        from nexpy.gui.utils import get_mainwindow

        mainwindow = get_mainwindow()
    if isinstance(root, NXfield):
        root = NXroot(NXentry(root))
    tree = mainwindow.tree
    name = tree_name(key, set(tree))
    tree[name] = root
    mainwindow.treeview.update()
    mainwindow.treeview.select_node(tree[name])
    return name


# ------------------------------------------------------------------- Qt side


def open_catalog(*_: Any) -> Any:
    """Menu action "Open from catalog…": show the browser (returned, for scripts)."""
    dialog = _dialogs()["CatalogDialog"]()
    dialog.show()
    return dialog


def open_wrapper(*_: Any, path: str | os.PathLike[str] | None = None) -> str | None:
    """Menu action "Open portable wrapper…": a file dialog, then nxload into the tree."""
    from nexpy.gui.utils import get_mainwindow

    from scatterbroker.clients.nexus import nxload

    mainwindow = get_mainwindow()
    if path is None:
        from nexpy.gui.pyqt import getOpenFileName

        path = getOpenFileName(mainwindow, "Open Portable Wrapper", str(mainwindow.default_directory),
                               "NeXus Files (*.nxs *.nx5 *.h5 *.hdf5 *.nexus);;Any Files (*.* *)")
        if not path:
            return None
    root = nxload(path)
    return add_to_nexpy(root, Path(path).stem, mainwindow)


def register_current(*_: Any) -> Any:
    """Menu action "Register current file": show the upload dialog (returned)."""
    dialog = _dialogs()["RegisterDialog"]()
    dialog.show()
    return dialog


@functools.lru_cache(maxsize=1)
def _dialogs() -> dict[str, type]:
    """Build the Qt dialog classes (NeXpy and Qt are imported here, on first use)."""
    from nexpy.gui.pyqt import QtCore, QtWidgets
    from nexpy.gui.widgets import NXDialog

    def status(label: Any, text: str, error: bool = False) -> None:
        label.setText(text)
        label.setStyleSheet("color: #b00020;" if error else "")
        label.setToolTip(text)

    def connection_form(dialog: Any) -> tuple[Any, Any, Any]:
        url = QtWidgets.QLineEdit(_last["url"])
        key = QtWidgets.QLineEdit(_last["api_key"])
        key.setEchoMode(QtWidgets.QLineEdit.Password)
        key.setPlaceholderText("API key (or $SCATTERBROKER_API_KEY)")
        form = QtWidgets.QFormLayout()
        form.addRow("Server URL", url)
        form.addRow("API key", key)
        return form, url, key

    class CatalogDialog(NXDialog):
        """Browse and search a catalog; open the selected node in NeXpy."""

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent=parent)
            self.session: CatalogSession | None = None
            form, self.url, self.key = connection_form(self)
            self.connect_button = QtWidgets.QPushButton("Connect")
            self.connect_button.clicked.connect(self.connect_server)
            self.search = QtWidgets.QLineEdit()
            self.search.setPlaceholderText("search, e.g. sample.temperature > 200 and sample.name == s1")
            self.search.returnPressed.connect(self.run_search)
            self.search_button = QtWidgets.QPushButton("Search")
            self.search_button.clicked.connect(self.run_search)
            self.tree = QtWidgets.QTreeWidget()
            self.tree.setColumnCount(3)
            self.tree.setHeaderLabels(["name", "kind", "shape / specs"])
            self.tree.itemExpanded.connect(self.expand)
            self.tree.itemDoubleClicked.connect(lambda *_: self.open_selected())
            self.tree.header().setStretchLastSection(True)
            self.tree.setColumnWidth(0, 220)
            self.open_button = QtWidgets.QPushButton("Open in NeXpy")
            self.open_button.clicked.connect(self.open_selected)
            self.close_button = QtWidgets.QPushButton("Close")
            self.close_button.clicked.connect(self.close)
            self.status = QtWidgets.QLabel("Give the server's URL and API key, then Connect.")
            self.status.setWordWrap(True)
            top = QtWidgets.QHBoxLayout()
            top.addLayout(form, 1)
            top.addWidget(self.connect_button)
            search = QtWidgets.QHBoxLayout()
            search.addWidget(self.search, 1)
            search.addWidget(self.search_button)
            buttons = QtWidgets.QHBoxLayout()
            buttons.addWidget(self.status, 1)
            buttons.addWidget(self.open_button)
            buttons.addWidget(self.close_button)
            layout = QtWidgets.QVBoxLayout()
            layout.addLayout(top)
            layout.addLayout(search)
            layout.addWidget(self.tree, 1)
            layout.addLayout(buttons)
            self.setLayout(layout)
            self.set_title("Open from catalog")
            self.resize(720, 520)
            self.loaded: list[str] = []

        # -- browsing

        def connect_server(self) -> bool:
            try:
                self.session = CatalogSession(self.url.text(), self.key.text() or None)
            except Exception as err:
                status(self.status, f"Cannot connect: {err}", error=True)
                return False
            _last.update(url=self.url.text().strip(), api_key=self.key.text())
            self.fill(self.tree.invisibleRootItem(), self.session.start)
            status(self.status, f"Connected to {self.session.base}.")
            return True

        def fill(self, parent: Any, path: str, query: str = "") -> None:
            while parent.childCount():
                parent.removeChild(parent.child(0))
            try:
                rows = self.session.children(path, query)
            except Exception as err:
                status(self.status, f"{path or '/'}: {err}", error=True)
                return
            for row in rows:
                item = QtWidgets.QTreeWidgetItem([row.key, row.family, row.detail])
                item.setData(0, QtCore.Qt.UserRole, row.path)
                item.setToolTip(0, row.uri)
                if row.expandable:
                    item.addChild(QtWidgets.QTreeWidgetItem(["…"]))  # filled on expand
                parent.addChild(item)
            if len(rows) >= LIST_LIMIT:
                parent.addChild(QtWidgets.QTreeWidgetItem([f"(first {LIST_LIMIT} shown: search to narrow)"]))

        def expand(self, item: Any) -> None:
            path = item.data(0, QtCore.Qt.UserRole)
            if path is not None and item.childCount() == 1 and item.child(0).text(0) == "…":
                self.fill(item, path)

        def run_search(self) -> None:
            if self.session is None and not self.connect_server():
                return
            item = self.tree.currentItem()
            path = item.data(0, QtCore.Qt.UserRole) if item is not None else None
            where = path if path is not None and item.childCount() else self.session.start
            try:
                parse_query(self.search.text())
            except Exception as err:
                status(self.status, f"Cannot search: {err}", error=True)
                return
            self.fill(self.tree.invisibleRootItem(), where or "", self.search.text())
            shown = self.tree.topLevelItemCount()
            status(self.status, f"{shown} matches under /{where or ''}")

        def select(self, path: str) -> bool:
            """Select the item for ``path``, expanding its parents (for scripts and tests)."""
            parent = self.tree.invisibleRootItem()
            parts = path.strip("/").split("/")
            for depth in range(len(parts)):
                wanted = "/".join(parts[: depth + 1])
                match = next((parent.child(i) for i in range(parent.childCount())
                              if parent.child(i).data(0, QtCore.Qt.UserRole) == wanted), None)
                if match is None:
                    return False
                if depth < len(parts) - 1:
                    match.setExpanded(True)
                    self.expand(match)
                parent = match
            self.tree.setCurrentItem(parent)
            return True

        def open_selected(self) -> str | None:
            item = self.tree.currentItem()
            path = item.data(0, QtCore.Qt.UserRole) if item is not None else None
            if self.session is None or path is None:
                status(self.status, "Select a node first.", error=True)
                return None
            status(self.status, f"Loading {path}…")
            QtWidgets.QApplication.processEvents()
            try:
                root = self.session.load(path)
                name = add_to_nexpy(root, path.rsplit("/", 1)[-1], self.mainwindow)
            except Exception as err:
                status(self.status, f"Cannot open {path}: {err}", error=True)
                return None
            self.loaded.append(name)
            status(self.status, f"Opened {path} as '{name}' (large fields read lazily).")
            return name

    class RegisterDialog(NXDialog):
        """Upload the tree selected in NeXpy as a new catalog node."""

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent=parent)
            node = self.mainwindow.treeview.get_node()
            self.source = node.nxroot if node is not None else None
            form, self.url, self.key = connection_form(self)
            user = os.environ.get("USER") or "me"
            default = f"uploads/{user}/{self.source.nxname if self.source is not None else 'file'}"
            self.target = QtWidgets.QLineEdit(_last.get("node") or default)
            form.addRow("New node", self.target)
            what = "(no tree selected)" if self.source is None else (
                f"{self.source.nxname}: {self.source.nxfilename or 'in memory, saved to a temporary file'}")
            self.what = QtWidgets.QLabel(f"Register {what}")
            self.register_button = QtWidgets.QPushButton("Register")
            self.register_button.clicked.connect(self.register)
            self.close_button = QtWidgets.QPushButton("Close")
            self.close_button.clicked.connect(self.close)
            self.status = QtWidgets.QLabel("Small data are stored on the server; links stay links.")
            self.status.setWordWrap(True)
            self.status.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
            buttons = QtWidgets.QHBoxLayout()
            buttons.addWidget(self.status, 1)
            buttons.addWidget(self.register_button)
            buttons.addWidget(self.close_button)
            layout = QtWidgets.QVBoxLayout()
            layout.addWidget(self.what)
            layout.addLayout(form)
            layout.addLayout(buttons)
            self.setLayout(layout)
            self.set_title("Register current file")
            self.resize(640, 200)
            self.report: Any = None

        def register(self) -> Any:
            if self.source is None:
                status(self.status, "Select a tree in NeXpy first.", error=True)
                return None
            try:
                session = CatalogSession(self.url.text(), self.key.text() or None)
                self.report = session.register(self.source, self.target.text().strip("/"))
            except Exception as err:
                status(self.status, f"Not registered: {err}", error=True)
                return None
            _last.update(url=self.url.text().strip(), api_key=self.key.text(), node="")
            status(self.status, f"Registered: {self.report.uri}")
            return self.report

    return {"CatalogDialog": CatalogDialog, "RegisterDialog": RegisterDialog}
