"""`codi train`: the training loop, its options, checkpoints with exact resume."""

from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import latest_checkpoint as latest_checkpoint
from ._checkpoint import list_checkpoints as list_checkpoints
from ._checkpoint import load_checkpoint as load_checkpoint
from ._checkpoint import save_checkpoint as save_checkpoint
from ._config import TrainConfig as TrainConfig
from ._config import TrainConfigError as TrainConfigError
from ._loop import TrainHooks as TrainHooks
from ._loop import TrainingError as TrainingError
from ._loop import train as train
from ._plan import with_model_defaults as with_model_defaults
from ._plan import Plan as Plan
from ._plan import plan as plan
