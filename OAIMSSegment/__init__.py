"""OAIMSSegment engine: click-guided U-Net with online adaptation (OAIMS).

No Qt and no Slicer imports here, except in :mod:`OAIMSSegment.mrml`, the MRML bridge.

Note: Slicer loads the scripted module file ``OAIMSSegment.py`` under the module name
``OAIMSSegment`` and that module sets its ``__path__`` to this folder, so this
``__init__`` is *not* executed inside Slicer. Keep it free of side effects and do not
rely on names defined here; import submodules explicitly (``from OAIMSSegment import session``).
"""

__version__ = "0.1.0"
