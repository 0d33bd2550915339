"""DICOM networking: the Storage SCP and what keeps a received instance, the SCU, the DIMSE
status table, TLS, access control, connection guards, network options, receiving processes."""
