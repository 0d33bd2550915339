"""DICOMweb (PS3.18): STOW-RS to a destination of kind = "dicomweb" and a QIDO-RS query to
check it (client.py), the STOW-RS receiver on the node's HTTP endpoint (receiver.py), the
multipart/related bodies both use (multipart.py) and what their HTTP statuses mean
(status.py)."""
