"""The NeXpy plugin: a "Catalog" menu in a real NeXpy window, against a real server.

Headless (``QT_QPA_PLATFORM=offscreen``, NeXpy's home in a temporary
directory) with pytest-qt. With ``SCATTERBROKER_SCREENSHOT=docs/nexpy.png``
and a display (e.g. ``xvfb-run -s "-screen 0 1400x900x24"``), the last test
writes the screenshot used in docs/wrappers.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import API_KEY, N_FRAMES, write_tree
from test_wrappers import customise, quick_server

SCREENSHOT = os.environ.get("SCATTERBROKER_SCREENSHOT")


# --------------------------------------------------------------- without Qt


def test_plugin_is_an_entry_point_with_a_catalog_menu():
    from importlib.metadata import entry_points

    from scatterbroker.clients.nexpy_plugin import plugin_menu

    (entry,) = [e for e in entry_points(group="nexpy.plugins") if e.module == "scatterbroker.clients.nexpy_plugin"]
    assert entry.load() is plugin_menu
    menu, actions = plugin_menu()
    assert menu == "Catalog"
    assert [label for label, _ in actions] == [
        "Open from catalog…", "Open portable wrapper…", "Register current file"]
    assert all(callable(action) for _, action in actions)


def test_search_box_queries_and_tree_names():
    from tiled.queries import Comparison, Eq, FullText, Regex

    from scatterbroker.clients.nexpy_plugin import parse_query, tree_name

    assert parse_query("sample/temperature >= 200 AND sample.name == 's1'; title ~ ^Ni") == [
        Comparison("ge", "sample.temperature", 200), Eq("sample.name", "s1"), Regex("title", "^Ni")]
    assert parse_query("nickel oxide") == [FullText("nickel oxide")]
    assert parse_query("") == []
    assert tree_name("scan-1", {"scan_1"}) == "scan_1_1" and tree_name("1a") == "n1a"


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """(URL, arrays, wrapper): scans registered, a customised wrapper uploaded."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register
    from scatterbroker.clients.nexus import wrap
    from scatterbroker.clients.upload import upload

    root = tmp_path_factory.mktemp("nexpy-site")
    arrays = write_tree(root / "beamline")
    scans = root / "beamline" / "scans"
    with quick_server(root / "server", [scans]) as url:
        register(from_uri(url, api_key=API_KEY), scans, prefix="scans")
        wrapper = root / "wrapped" / "scan1.nxs"
        wrap(f"{url}/api/v1/metadata/scans/s1/scan1", wrapper, api_key=API_KEY)
        custom = root / "home" / "custom1.nxs"
        custom.parent.mkdir()
        shutil.copy(wrapper, custom)
        customise(custom)
        upload(custom, f"{url}/api/v1/metadata/uploads/ana/custom1", api_key=API_KEY)
        yield url, arrays, wrapper


@pytest.fixture(scope="module")
def window(tmp_path_factory):
    """NeXpy's main window (with its IPython console), the plugin switched on."""
    pytest.importorskip("PySide6", reason="PySide6 not installed: pip install 'scatterbroker[nexpy]'")
    pytest.importorskip("nexpy", reason="NeXpy not installed: pip install 'scatterbroker[nexpy]'")
    pytest.importorskip("pytestqt", reason="pytest-qt not installed (dev extra)")
    home = tmp_path_factory.mktemp("nexpy-home")
    (home / ".nexpy").mkdir()
    (home / ".nexpy" / "settings.ini").write_text("[plugins]\nscatterbroker.clients.nexpy_plugin = 1\n")
    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(home))
    if not (SCREENSHOT and os.environ.get("DISPLAY")):
        patch.setenv("QT_QPA_PLATFORM", "offscreen")
    # NeXpy takes over process-wide state; give it back to pytest after start-up.
    saved = (sys.stdout, sys.stderr, sys.excepthook, signal.getsignal(signal.SIGINT),
             logging.root.handlers[:], logging.root.level)

    def restore() -> None:
        sys.stdout, sys.stderr, sys.excepthook = saved[:3]
        signal.signal(signal.SIGINT, saved[3])
        logging.root.handlers[:] = saved[4]
        logging.root.setLevel(saved[5])

    from nexpy.gui.consoleapp import NXConsoleApp

    app = NXConsoleApp()
    try:
        app.initialize(argparse.Namespace(filenames=[], restore=False, faulthandler=False))
    finally:
        restore()  # stdout/stderr to its log, its excepthook, SIGINT handler, log file
    win = app.window
    try:
        yield win
    finally:
        for dialog in list(win.dialogs):
            dialog.close()
        win.console.shutdown()
        win.close_files()
        restore()
        patch.undo()


def menu_action(win, label: str):
    menus = {a.text(): a.menu() for a in win.menuBar().actions()}
    return next(a for a in menus["Catalog"].actions() if a.text() == label)


def new_dialog(win, label: str):
    before = list(win.dialogs)
    menu_action(win, label).trigger()
    (dialog,) = [d for d in win.dialogs if d not in before]
    return dialog


def connect(dialog, qtbot, url: str, key: str = API_KEY) -> None:
    from nexpy.gui.pyqt import QtCore

    dialog.url.setText(url)
    dialog.key.setText(key)
    qtbot.mouseClick(dialog.connect_button, QtCore.Qt.LeftButton)


def top_level(dialog) -> list[str]:
    return [dialog.tree.topLevelItem(i).text(0) for i in range(dialog.tree.topLevelItemCount())]


# ---------------------------------------------------------------- in NeXpy


def test_catalog_menu_is_in_nexpy(window):
    menus = [a.text() for a in window.menuBar().actions()]
    assert "Catalog" in menus
    assert menu_action(window, "Open from catalog…").isEnabled()


def test_open_a_customised_upload_from_the_catalog(window, catalog, qtbot):
    from nexpy.gui.pyqt import QtCore

    from scatterbroker.clients.nexus import RemoteField

    url, arrays, _ = catalog
    dialog = new_dialog(window, "Open from catalog…")
    connect(dialog, qtbot, url)
    assert sorted(top_level(dialog)) == ["scans", "uploads"], dialog.status.text()
    assert dialog.select("uploads/ana/custom1")
    qtbot.mouseClick(dialog.open_button, QtCore.Qt.LeftButton)
    name = dialog.loaded[-1]
    root = window.tree[name]
    assert window.treeview.get_node() is root
    assert root.entry.fit.nxclass == "NXprocess" and root.entry.fit.chi2.nxvalue == 1.25
    assert root.entry.sample.temperature.attrs["checked_by"] == "ana"
    data = root.entry.data.data
    assert isinstance(data, RemoteField) and data.last_source is None  # lazy
    assert np.array_equal(data[N_FRAMES - 2].nxdata, arrays["cbf"][N_FRAMES - 2])
    root.entry.data.plot()  # NeXpy plots a 3-D signal one frame at a time, through the URI
    assert window.plotview.data is not None
    dialog.close()


def test_search_the_catalog_from_the_dialog(window, catalog, qtbot):
    url, _, _ = catalog
    dialog = new_dialog(window, "Open from catalog…")
    connect(dialog, qtbot, url)
    assert dialog.select("scans/s1")
    dialog.search.setText("sample.temperature > 200")
    dialog.run_search()
    assert top_level(dialog) == ["scan1"], dialog.status.text()
    assert dialog.select("scans/s1") is False  # the tree now lists the matches
    dialog.connect_server()
    dialog.select("scans/s1")
    dialog.search.setText("sample/temperature > 300")
    dialog.run_search()
    assert top_level(dialog) == []
    dialog.close()


def test_register_the_current_file(window, catalog, qtbot, tmp_path):
    from nexpy.gui.pyqt import QtCore
    from tiled.client import from_uri

    from scatterbroker.clients.nexpy_plugin import open_wrapper
    from scatterbroker.clients.nexus import RemoteField, nxload

    url, arrays, wrapper = catalog
    away = tmp_path / "far" / "away"
    away.mkdir(parents=True)
    shutil.copy(wrapper, away / "portable.nxs")
    name = open_wrapper(path=away / "portable.nxs")  # "Open portable wrapper…" without its file dialog
    assert isinstance(window.tree[name].entry.data.data, RemoteField)
    window.treeview.select_node(window.tree[name].entry)
    dialog = new_dialog(window, "Register current file")
    dialog.url.setText(url)
    dialog.key.setText(API_KEY)
    dialog.target.setText("uploads/ana/from-nexpy")
    qtbot.mouseClick(dialog.register_button, QtCore.Qt.LeftButton)
    assert dialog.status.text() == f"Registered: {url}/api/v1/metadata/uploads/ana/from-nexpy"
    node = from_uri(url, api_key=API_KEY)["uploads/ana/from-nexpy"]
    assert [s.name for s in node["entry/data/data"].specs] == ["sb-link"]
    again = nxload(f"{url}/api/v1/metadata/uploads/ana/from-nexpy", api_key=API_KEY, local=False)
    assert np.array_equal(again.entry.data.data[0].nxdata, arrays["cbf"][0])
    # Registering it again is refused (no overwrite), in the dialog's status line.
    qtbot.mouseClick(dialog.register_button, QtCore.Qt.LeftButton)
    assert "exists already" in dialog.status.text()
    dialog.close()


def test_connection_errors_show_in_the_dialog(window, qtbot):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    dialog = new_dialog(window, "Open from catalog…")
    connect(dialog, qtbot, f"http://127.0.0.1:{port}")
    assert dialog.status.text().startswith("Cannot connect") and str(port) in dialog.status.text()
    assert top_level(dialog) == []
    dialog.close()


@pytest.mark.skipif(not SCREENSHOT, reason="set SCATTERBROKER_SCREENSHOT=PATH (with a display) to write it")
def test_screenshot(window, catalog, qtbot):
    """The catalog dialog and a lazily plotted catalog node, for docs/wrappers.md."""
    from nexpy.gui.pyqt import QtWidgets

    url, _, _ = catalog
    window.resize(1280, 860)
    window.move(0, 0)
    window.show()
    dialog = new_dialog(window, "Open from catalog…")
    connect(dialog, qtbot, url)
    dialog.select("uploads/ana/custom1")
    dialog.open_selected()
    root = window.tree[dialog.loaded[-1]]
    window.treeview.expandAll()
    root.entry.data.plot()
    dialog.resize(660, 370)
    dialog.move(610, 488)
    dialog.select("scans/s1/scan1/entry/data/data")
    qtbot.wait(500)
    screen = QtWidgets.QApplication.primaryScreen()
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        image = window.grab()
    else:
        image = screen.grabWindow(0, 0, 0, 1280, 860)
    Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
    assert image.save(str(SCREENSHOT))
