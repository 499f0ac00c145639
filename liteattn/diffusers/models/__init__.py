"""One file per diffusers model family: its liteattn processor and its registration (``registry.register``).

Every module here is imported by ``registry.families()``; adding a family is adding a file.
"""
