"""anim_lab: learn portrait animation diffusion by building it.

One module per concept (see README.md); chapters in chapters/ import from here.
"""

__version__ = "0.1.0"
