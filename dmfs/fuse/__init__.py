"""The FUSE front end: `operations` translates FUSE requests into pool and
volume calls, `control` parses and dispatches the ``user.dmfs.*`` xattrs."""
