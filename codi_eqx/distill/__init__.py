"""CoDi distillation (and the plain ControlNet objective): options, loss, train state, the
compiled data-parallel step."""

from ._config import DistillConfig as DistillConfig
from ._config import OptimConfig as OptimConfig
from ._loss import diffusion_loss as diffusion_loss
from ._loss import draw_example as draw_example
from ._loss import example_loss as example_loss
from ._loss import teacher_is_online as teacher_is_online
from ._loss import teacher_output as teacher_output
from ._loss import teacher_params as teacher_params
from ._loss import guided_output as guided_output
from ._loss import model_output as model_output
from ._optim import lr_schedule as lr_schedule
from ._optim import make_optimizer as make_optimizer
from ._state import Frozen as Frozen
from ._state import TrainState as TrainState
from ._state import Trainable as Trainable
from ._state import init_train_state as init_train_state
from ._state import make_frozen as make_frozen
from ._step import ema_update as ema_update
from ._step import ACCUMULATION_LOOPS as ACCUMULATION_LOOPS
from ._step import accumulation_loop_for as accumulation_loop_for
from ._step import make_train_step as make_train_step
from ._step import metric_names as metric_names
