"""Training data: datasets read lazily (the seed's folder layout, imagefolder, Hugging Face
datasets, WebDataset-style tar shards), a deterministic resumable loader, and a latent cache."""

from ._cache import LatentCache as LatentCache
from ._errors import DataError as DataError
from ._folder import JsonlFolder as JsonlFolder
from ._folder import resolve_path as resolve_path
from ._hf import HFDataset as HFDataset
from ._loader import DataLoader as DataLoader
from ._loader import global_batch_size as global_batch_size
from ._open import DataConfig as DataConfig
from ._open import Dataset as Dataset
from ._open import open_dataset as open_dataset
from ._records import RawExample as RawExample
from ._records import decode_example as decode_example
from ._tar import TarShards as TarShards
from ._tar import expand_braces as expand_braces
from ._transforms import image_to_array as image_to_array
from ._transforms import resize_center_crop as resize_center_crop
