"""Real DICOM peers for integration tests: Orthanc (PACS), DCMTK (modality), validators.

Import from here: `from tests.integration.peers import Orthanc, storescu, dciodvfy, ...`.
"""

from __future__ import annotations

from tests.integration.peers.dcmtk import (
    StoreSCP,
    echoscu,
    start_storescp,
    storescu,
    storescu_syntax_args,
)
from tests.integration.peers.orthanc import Modality, Orthanc, start_orthanc
from tests.integration.peers.process import ManagedProcess, PeerDied
from tests.integration.peers.pynetdicom_scu import NO_ANSWER, send_files
from tests.integration.peers.tools import (
    find_tool,
    free_port,
    in_ci,
    nodelay_env,
    port_open,
    require_tool,
    skip_or_fail,
    wait_until,
)
from tests.integration.peers.validators import (
    DciodvfyReport,
    dciodvfy,
    dciodvfy_report,
    dcm2niix_affine,
    dcm2niix_affines,
    nifti_affine,
)

__all__ = [
    "NO_ANSWER",
    "DciodvfyReport",
    "ManagedProcess",
    "Modality",
    "Orthanc",
    "PeerDied",
    "StoreSCP",
    "dciodvfy",
    "dciodvfy_report",
    "dcm2niix_affine",
    "dcm2niix_affines",
    "echoscu",
    "find_tool",
    "free_port",
    "in_ci",
    "nifti_affine",
    "nodelay_env",
    "port_open",
    "require_tool",
    "send_files",
    "skip_or_fail",
    "start_orthanc",
    "start_storescp",
    "storescu",
    "storescu_syntax_args",
    "wait_until",
]
