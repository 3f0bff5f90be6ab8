"""The one container image every component runs in: the only place that names it.

Set ``IMTEXT_IMAGE`` when compiling or submitting to use another build of the project's
``Dockerfile`` (for example a tag per commit); the image must have the ``imtext`` package and its
pinned dependencies (``kfp`` included) installed, since components install nothing at run time.
"""

import os

DEFAULT_IMAGE = "ghcr.io/imtext/imtext:0.1.0"

#: Reference of the project image, read when ``components`` is first imported.
IMAGE = os.environ.get("IMTEXT_IMAGE", "").strip() or DEFAULT_IMAGE
