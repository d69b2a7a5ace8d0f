"""UniGeoSeg for QGIS: instruction-driven segmentation of remote sensing imagery.

QGIS imports this package (installed as the folder ``unigeoseg_qgis``) while it starts, for
every enabled plugin, before the main window is shown. So this module imports nothing at
module level: the plugin class, Qt widgets, pyzmq and the protocol package are loaded only
when QGIS calls :func:`classFactory`. The heavy model (torch, SAM) never runs in QGIS's
Python: it lives in a separate backend process that the plugin talks to over ZeroMQ.

All imports inside the package are relative, so the folder can be renamed by the plugin
manager or linked for development (``scripts/link_plugin.sh``) without changes.
"""


def classFactory(iface):  # the name QGIS looks for
    """Create the plugin object for QGIS (``iface`` is the ``QgisInterface``)."""
    # pyzmq may live in the plugin-private site directory (see deps.py): put it on sys.path
    # before anything that imports zmq is loaded.
    from . import deps

    deps.add_private_site_dir()

    from .plugin import UniGeoSegPlugin

    return UniGeoSegPlugin(iface)
