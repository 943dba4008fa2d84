"""Everything an aggregator run is configured by (TOML [aggregator], FEDMQ_*, flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aggregator.fedbuff import BufferPolicy
from aggregator.rounds import RoundPolicy
from aggregator.selection import Participation, Selector, make_selection
from fedmq.chunks import DEFAULT_MAX_MESSAGE_BYTES
from fedmq.codecs import Pipeline, check_downlink, parse_pipeline
from fedmq.correction import CORRECTIONS
from fedmq.link import BrokerAddress, require_credentials
from fedmq.topics import Topics
from fedmq.wire import TrainConfig, max_selected_ids
from fedmq.wire.rounds import MAX_PROX_MU


@dataclass(frozen=True)
class AggregatorSettings:
    """One aggregator's job, broker, round policy and local training config."""

    job: str = "demo"
    prefix: str = "fedmq"
    host: str = "127.0.0.1"
    port: int = 1883
    mqtt_version: str = "5"
    username: str | None = None
    password: str | None = None
    task: str = "mnist-2nn"
    state_dir: Path = Path("fedmq-state")
    rounds: int = 50  # rounds to run; 0 runs until stopped
    target_accuracy: float = 0.0  # stop once the global model reaches it; 0 never
    # the central test set (aggregator.evalset): "" the task's own, "none", or an .npz path
    eval_data: str = ""
    devices_per_round: int = 0  # updates that complete a round; 0 = all online devices
    over_select: float = 0.0
    min_devices: int = 1
    round_timeout_s: float = 60.0
    start_wait_s: float = 30.0  # open a smaller round if the fleet is not all online by then
    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    momentum: float = 0.0
    # the server optimiser on the mean delta (docs/strategies.md); 0 lr: the optimiser's own
    server_optimizer: str = "sgd"  # sgd (FedAvg) | avgm | adam | yogi | adagrad
    server_lr: float = 0.0  # sgd and avgm 1, adam and yogi 1e-2, adagrad 1e-1
    server_momentum: float = 0.9  # beta1: avgm's momentum, the adaptive ones' first moment
    server_beta2: float = 0.99  # adam and yogi: decay of the second moment
    server_tau: float = 1e-3  # adam, yogi, adagrad: adaptivity (epsilon); v starts at tau^2
    prox_mu: float = 0.0  # FedProx: proximal term mu/2 ||w - w_global||^2 on devices; 0 off
    # device selection (docs/strategies.md "Selection"): random | utility (Oort-style)
    selection: str = "random"
    selection_exploration: float = 0.1  # utility: fraction of picks among untried devices
    selection_round_s: float = 0.0  # utility: preferred round duration T; 0: the median
    selection_speed_alpha: float = 2.0  # utility: devices slower than T weigh (T / t)^alpha
    selection_max_skip_rounds: int = 0  # utility: guard; 0: 4 x ceil(online / picks)
    # personal models on devices (docs/strategies.md), announced in each round's train map
    personalization: str = "none"  # none | finetune | fedper
    personal_steps: int = 50  # local SGD steps of the personal model (fedper: of its head)
    personal_head: str = ""  # fedper: comma-separated head tensors; "": the task's last layer
    client_correction: str = "none"  # none | scaffold (control variates, fedmq.correction)
    normalize_local_work: bool = False  # FedNova: each delta / its tau_i, times tau_eff
    seed: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_update_bytes: int = 64 * 1024 * 1024  # refuse any update payload larger than this
    publish_onnx: bool = True
    mode: str = "sync"  # sync: rounds with a deadline; async: FedBuff
    buffer_size: int = 10  # async: updates per new version (K)
    staleness_exponent: float = 0.5  # async: weight (1 + staleness)^-a
    max_staleness: int = 20  # async: updates older than this many versions are rejected
    codec: str = "topk:0.1+int8+zstd"  # the update pipeline announced to devices
    update_budget_bytes: int = 0  # byte budget of one update, announced; 0: none
    # compressed by default, the same defaults as `fedmq demo` (README "Choosing a codec")
    downlink: str = "fp16"  # codec of each version's full payload
    downlink_delta: str = "int8+zstd"  # also publish a delta from the previous version ("": off)
    drop_grace_s: float = 8.0  # a Will counts as a dropout after this long (see presence.py)
    keep_versions: int = 10  # global versions kept in the state directory; 0 keeps all
    snapshot_every: int = 500  # accepted updates between snapshots of the open round's sum
    # bounds on what peers can make the aggregator hold (docs/protocol.md section 9)
    max_selected: int = 1000  # devices one round selects at most (and as many as fit a message)
    max_devices: int = 10_000  # the device table (without a fleet file: anyone may appear)
    max_partial_updates_per_device: int = 4  # chunked updates one device may have in flight

    # admission bounds and robust aggregation (docs/robustness.md)
    rule: str = "fedavg"  # fedavg | median | trimmed_mean | krum | clip
    norm_bound: float = 0.0  # fixed L2 bound on an update's delta; 0: adaptive
    norm_bound_factor: float = 3.0  # adaptive bound: k x the previous round's median norm
    max_examples: int = 100_000  # cap on num_examples (the fleet file's max_examples if lower)
    examples_factor: float = 1.0  # adaptive cap: k x the previous round's median num_examples
    trim_fraction: float = 0.2  # trimmed_mean: fraction dropped at each end per coordinate
    krum_f: int = 2  # krum: Byzantine updates tolerated per round
    krum_m: int = 0  # krum: updates averaged (1: Krum; 0: n - f, Multi-Krum)
    clip_norm: float = 0.0  # clip: C; 0: the previous round's median norm (not with DP)
    dp_noise_multiplier: float = 0.0  # central DP: noise std z x clip_norm on the sum
    dp_epsilon: float = 0.0  # central DP: derive z to spend this epsilon over `rounds`
    dp_delta: float = 1e-5  # central DP: the delta epsilon is reported at

    # the Prometheus endpoint (docs/metrics.md): off by default, so several aggregators and
    # the tests on one host never collide on a port
    metrics_port: int = 0  # 0: off
    metrics_host: str = "127.0.0.1"

    # trust (docs/security.md): TLS files, the Ed25519 key that signs the downlink, the fleet
    # file of enrolled devices; insecure = plain MQTT, no credentials, unsigned downlink
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    signing_key: Path | None = None
    fleet_file: Path | None = None
    insecure: bool = False
    connect_timeout_s: float = 60.0  # give up when no broker answered by then; 0: never

    def __post_init__(self) -> None:
        self.topics  # noqa: B018 - validates job and prefix
        self.broker  # noqa: B018 - validates host, port, version
        self.policy  # noqa: B018
        self.train  # noqa: B018
        self.buffer  # noqa: B018
        self.selector  # noqa: B018
        if self.selection != "random" and (self.dp_noise_multiplier or self.dp_epsilon):
            raise ValueError("central DP accounts its sampling rate as uniform random selection: "
                             "use selection = 'random' with dp_*")  # fmt: skip
        require_credentials(self.broker, insecure=self.insecure, bundle="the aggregator bundle "
                            "of `fedmq fleet init`, e.g. --config bundles/aggregator.<job>/"
                            "aggregator.toml")  # fmt: skip
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be 'sync' or 'async', got {self.mode!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0 (0 = run until stopped), got {self.rounds}")
        if not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in [0, 1], got {self.target_accuracy}")
        if self.start_wait_s < 0:
            raise ValueError("start_wait_s must be >= 0")
        self._check_learning()
        if self.max_message_bytes < 1024 or self.max_update_bytes < 1024:
            raise ValueError("max_message_bytes and max_update_bytes must be at least 1024")
        if self.update_budget_bytes and not 1024 <= self.update_budget_bytes <= (
            self.max_update_bytes
        ):
            raise ValueError(
                "update_budget_bytes must be 0 (none) or between 1024 and max_update_bytes"
            )
        if self.max_devices < 1 or self.max_partial_updates_per_device < 1:
            raise ValueError("max_devices and max_partial_updates_per_device must be at least 1")
        if self.connect_timeout_s < 0:
            raise ValueError("connect_timeout_s must be >= 0 (0: wait forever)")
        if not 0 <= self.drop_grace_s <= 3600:
            raise ValueError(f"drop_grace_s must be in [0, 3600], got {self.drop_grace_s}")
        if self.keep_versions < 0 or self.keep_versions == 1 or self.snapshot_every < 1:
            # the committed version must outlive the publication of the next one
            raise ValueError(
                "keep_versions must be 0 (keep all) or at least 2, snapshot_every at least 1"
            )
        if not 0 <= self.metrics_port <= 65535 or not self.metrics_host:
            raise ValueError("metrics_port must be in [0, 65535] (0 = off), metrics_host set")
        self._check_robustness()
        try:
            self.update_pipeline  # noqa: B018
            check_downlink(self.downlink_pipeline, self.downlink_delta_pipeline)
        except ValueError as err:
            raise ValueError(f"codec settings: {err}") from None

    def _check_learning(self) -> None:
        from aggregator.server_opt import (
            SERVER_OPTIMIZERS,
            check_hyperparameters,
            default_server_lr,
        )

        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, "
                             f"got {self.server_optimizer!r}")  # fmt: skip
        if self.server_lr < 0:
            raise ValueError(f"server_lr must be > 0, or 0 for the optimiser's default; got "
                             f"{self.server_lr}")  # fmt: skip
        lr = self.server_lr or default_server_lr(self.server_optimizer)
        check_hyperparameters(lr=lr, momentum=self.server_momentum, beta2=self.server_beta2,
                              tau=self.server_tau)  # fmt: skip
        if not 0 <= self.prox_mu <= MAX_PROX_MU or self.prox_mu * self.lr >= 1:
            raise ValueError(f"prox_mu must be in [0, {MAX_PROX_MU:g}] with prox_mu x lr < 1 "
                             f"(else each local step overshoots the global model); got "
                             f"prox_mu={self.prox_mu}, lr={self.lr}")  # fmt: skip
        if self.client_correction not in CORRECTIONS:
            raise ValueError(f"client_correction must be one of {', '.join(CORRECTIONS)}, got "
                             f"{self.client_correction!r}")  # fmt: skip
        if (self.client_correction != "none" or self.normalize_local_work) and (
                self.rule != "fedavg" or self.mode != "sync"):  # fmt: skip
            raise ValueError("client_correction and normalize_local_work need rule = 'fedavg' "
                             "and mode = 'sync'")  # fmt: skip
        if self.client_correction == "scaffold" and self.personalization == "fedper":
            raise ValueError("client_correction = 'scaffold' and personalization = 'fedper' do "
                             "not combine: fedper's updates leave the head out, SCAFFOLD's "
                             "control variates cover the whole model")  # fmt: skip

    def _check_robustness(self) -> None:
        from aggregator.bounds import MAX_EXAMPLES_LIMIT
        from aggregator.robust import RULES

        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.norm_bound < 0 or self.norm_bound_factor < 0 or self.clip_norm < 0:
            raise ValueError("norm_bound, norm_bound_factor and clip_norm must be >= 0")
        if self.norm_bound_factor and self.norm_bound_factor < 1:
            raise ValueError("norm_bound_factor must be 0 (off) or at least 1: below the "
                             "median it would clip most honest updates")  # fmt: skip
        if self.examples_factor and self.examples_factor < 1:
            raise ValueError("examples_factor must be 0 (off) or at least 1: below the median "
                             "it would cap half of the honest devices")
        if not 1 <= self.max_examples <= MAX_EXAMPLES_LIMIT:
            raise ValueError(f"max_examples must be in [1, {MAX_EXAMPLES_LIMIT}]")
        if not 0 <= self.trim_fraction < 0.5 or self.krum_f < 0 or self.krum_m < 0:
            raise ValueError("trim_fraction must be in [0, 0.5), krum_f and krum_m >= 0")
        if self.dp_noise_multiplier < 0 or self.dp_epsilon < 0 or not 0 < self.dp_delta < 1:
            raise ValueError("dp_noise_multiplier and dp_epsilon must be >= 0, dp_delta in (0, 1)")
        if self.dp_noise_multiplier and self.dp_epsilon:
            raise ValueError("set dp_noise_multiplier or dp_epsilon, not both")
        if self.dp_noise_multiplier or self.dp_epsilon:
            if self.rule != "clip" or not self.clip_norm > 0:
                raise ValueError("central DP needs rule = 'clip' and a fixed clip_norm > 0: "
                                 "a bound learnt from the updates would leak them")  # fmt: skip
            if self.dp_epsilon and not self.rounds:
                raise ValueError("dp_epsilon needs a number of rounds to spread it over")

    @property
    def update_pipeline(self) -> Pipeline:
        return parse_pipeline(self.codec)

    @property
    def downlink_pipeline(self) -> Pipeline:
        return parse_pipeline(self.downlink)

    @property
    def downlink_delta_pipeline(self) -> Pipeline | None:
        return parse_pipeline(self.downlink_delta) if self.downlink_delta else None

    @property
    def topics(self) -> Topics:
        return Topics(job=self.job, prefix=self.prefix)

    @property
    def broker(self) -> BrokerAddress:
        return BrokerAddress(
            host=self.host,
            port=self.port,
            mqtt_version=self.mqtt_version,
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )

    @property
    def policy(self) -> RoundPolicy:
        return RoundPolicy(
            target=self.devices_per_round,
            over_select=self.over_select,
            min_devices=self.min_devices,
            timeout_s=self.round_timeout_s,
            max_selected=self.selection_cap,
        )

    @property
    def selection_cap(self) -> int:
        """The most devices a round selects: max_selected, and no more ids than fit one
        round message of max_message_bytes."""
        if self.max_selected < 1:
            raise ValueError(f"max_selected must be at least 1, got {self.max_selected}")
        return min(self.max_selected, max_selected_ids(self.max_message_bytes))

    @property
    def buffer(self) -> BufferPolicy:
        return BufferPolicy(
            buffer_size=self.buffer_size,
            staleness_exponent=self.staleness_exponent,
            max_staleness=self.max_staleness,
        )

    @property
    def selector(self) -> Selector:
        """A fresh selection policy and its (empty) participation table."""
        policy = make_selection(policy=self.selection, exploration=self.selection_exploration,
                                round_s=self.selection_round_s,
                                speed_alpha=self.selection_speed_alpha,
                                max_skip_rounds=self.selection_max_skip_rounds)  # fmt: skip
        return Selector(policy=policy, table=Participation(censor=self.mode == "sync"))

    @property
    def train(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
            prox_mu=self.prox_mu, personal=self.personalization,
            personal_steps=self.personal_steps, correction=self.client_correction,
        )  # fmt: skip

    @property
    def personal_head_names(self) -> tuple[str, ...]:
        """personal_head as tensor names; () for the task's own head."""
        return tuple(n.strip() for n in self.personal_head.split(",") if n.strip())
