"""The lake's DICOM network services: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and DIMSE.

Viewers, PACS and modalities speak DICOM, not SQL. These services answer them from the same
Delta tables, roles, de-identification and audit as the SQL endpoint, and take new instances
in through the same way in as every upload (the stream when it runs, batch ingest otherwise).
"""
