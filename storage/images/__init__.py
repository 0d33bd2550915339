"""DICOM image code: stored series -> stacks and volumes (series.py), volume -> derived series
(derive.py, derived_uids.py), Siemens mosaics, series the node recognises and leaves alone."""
