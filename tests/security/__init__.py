"""The security suite: fuzz targets and their documentation (see README.md)."""
