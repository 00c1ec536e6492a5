"""Data in and out: locations and file systems, input formats, the one reader, output parts and folders."""
