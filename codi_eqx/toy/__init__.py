"""The built-in default: a synthetic shapes world, a small Stable Diffusion teacher trained on
it, and the analysis that judges generated shapes without any of the models under test."""

from . import _shapes as shapes  # noqa: F401
from ._pretrain import PretrainConfig as PretrainConfig
from ._pretrain import pretrain_teacher as pretrain_teacher
from ._builtin import ADAPTERS as ADAPTERS
from ._builtin import TOY_TRAIN_DEFAULTS as TOY_TRAIN_DEFAULTS
from ._builtin import BuiltinMissingError as BuiltinMissingError
from ._builtin import builtin_adapter as builtin_adapter
from ._builtin import builtin_teacher as builtin_teacher
from ._builtin import prepare_builtin_run as prepare_builtin_run
from ._analysis import Analysis as Analysis
from ._analysis import FeatureNet as FeatureNet
from ._analysis import Region as Region
from ._analysis import analyse_image as analyse_image
from ._analysis import caption_match as caption_match
from ._analysis import caption_match_parts as caption_match_parts
from ._analysis import edge_f1 as edge_f1
from ._analysis import features as features
from ._analysis import frechet_distance as frechet_distance
from ._analysis import image_edges as image_edges
from ._analysis import load_feature_net as load_feature_net
from ._analysis import save_feature_net as save_feature_net
from ._analysis import train_feature_net as train_feature_net
