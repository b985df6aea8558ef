"""vidopt core: config, video decoding, data, models, metrics, storage and tracking — usable without Prefect or Ray."""
from vidopt._versions import check_torch_xla_pairing

__version__ = "0.1.0"

check_torch_xla_pairing()
