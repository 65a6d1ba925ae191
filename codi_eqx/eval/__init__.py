"""Evaluation: statistics that decide between methods (paired bootstrap intervals)."""

from ._bootstrap import Interval as Interval
from ._bootstrap import bootstrap_indices as bootstrap_indices
from ._bootstrap import mean_interval as mean_interval
from ._bootstrap import paired_ratio_interval as paired_ratio_interval
from ._bootstrap import paired_statistic_interval as paired_statistic_interval
