"""Names of everything that crosses the wire, shared by `client/` and `server/` (no Flower here)."""

# RecordDict keys
ARRAYS = "arrays"                # global initialisation theta, server -> hospital
GRADIENT = "meta-gradient"       # meta-gradient / model delta, hospital -> server
METRICS = "metrics"
CONFIG = "config"
STATUS = "status"                # ConfigRecord with a human-readable reason when a hospital declines

# Metric keys (hospital -> server)
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
EPSILON = "epsilon"
DELTA = "delta"
ROUNDS = "rounds-participated"
DECLINED = "declined"
HOSPITAL_ID = "hospital-id"
HELD_OUT = "held-out"            # query reply: 1 if the hospital's own role is held-out, 0 if training
ACCURACY = "accuracy"
AUC = "auc"
ACCURACY_BEFORE = "accuracy-before"
AUC_BEFORE = "auc-before"
LOSS_BEFORE = "loss-before"
NUM_SUPPORT = "num-support"

# Config keys (server -> hospital)
SERVER_ROUND = "server-round"
ADAPT_GRID = "adapt-grid"        # evaluate: score every point of the adaptation grid (validation hospitals)
ADAPT_METHOD = "adapt-method"    # evaluate: adapt this way (the choice made on validation hospitals)
ADAPT_LR = "adapt-lr"
ADAPT_STEPS = "adapt-steps"

# Error reply codes (hospital -> server). The reason sent with them holds no facts about the records;
# the details stay in the hospital's own log.
ERROR_REFUSED = 4001    # the hospital's policy refuses the request (role, limits, DP required, budget)
ERROR_DATA = 4002       # the hospital's records failed its checks
ERROR_CONFIG = 4003     # the run config or node config is invalid
ERROR_INTERNAL = 4004   # anything else

TRAIN_METRICS = (NUM_EXAMPLES, LOSS, EPSILON, DELTA, ROUNDS)
EVAL_METRICS = (NUM_EXAMPLES, NUM_SUPPORT, ACCURACY, AUC, LOSS, ACCURACY_BEFORE, AUC_BEFORE, LOSS_BEFORE)

# Adaptation-grid metrics (held-out hospital -> server, with tune-adaptation): "<metric>@<method>:<lr>:<steps>"
GRID_SEPARATOR = "@"


def grid_metric(metric: str, point: tuple[str, float, int]) -> str:
    method, lr, steps = point
    return f"{metric}{GRID_SEPARATOR}{method}:{lr:g}:{steps}"


def parse_grid_metric(key: str) -> tuple[str, tuple[str, float, int]] | None:
    """(metric, grid point) of a grid metric name, None for any other name."""
    if GRID_SEPARATOR not in key:
        return None
    metric, rest = key.split(GRID_SEPARATOR, 1)
    parts = rest.split(":")
    if len(parts) != 3:
        return None
    try:
        return metric, (parts[0], float(parts[1]), int(parts[2]))
    except ValueError:
        return None
