"""Building blocks shared by the models: layers in PyTorch's layout, attention, resnets."""

from ._attention import Attention as Attention
from ._attention import attention_implementation as attention_implementation
from ._layers import Conv2d as Conv2d
from ._layers import Embedding as Embedding
from ._layers import GroupNorm as GroupNorm
from ._layers import LayerNorm as LayerNorm
from ._layers import Linear as Linear
from ._resnet import Downsample2D as Downsample2D
from ._resnet import ResnetBlock2D as ResnetBlock2D
from ._resnet import Upsample2D as Upsample2D
