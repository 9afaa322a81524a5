"""adam_inrun: optimizer-aware In-Run Data Shapley for JAX, Optax and Flax."""

from adam_inrun import evaluation
from adam_inrun import groundtruth
from adam_inrun import ledger
from adam_inrun import sharding
from adam_inrun.estimators import AttributionInputs
from adam_inrun.estimators import adam_fixed_state
from adam_inrun.estimators import path_shapley
from adam_inrun.estimators import sgd_proxy
from adam_inrun.ghost import coverage
from adam_inrun.ghost import ghost_dots
from adam_inrun.ledger import LedgerState
from adam_inrun.train_step import StepDiagnostics
from adam_inrun.train_step import make_train_step

__version__ = '0.1.0'
