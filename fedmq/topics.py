"""The topic tree, built in one place: no f-string topics anywhere else.

| topic                                   | direction              | retained |
|-----------------------------------------|------------------------|----------|
| <prefix>/<job>/global                   | aggregator -> devices  | yes      |
| <prefix>/<job>/global/<version>/<i>     | aggregator -> devices  | yes      |
| <prefix>/<job>/round                    | aggregator -> devices  | yes      |
| <prefix>/<job>/update/<device>          | device -> aggregator   | no       |
| <prefix>/<job>/ack/<device>             | aggregator -> device   | no       |
| <prefix>/devices/<device>/state         | device (and its Will)  | yes      |
| <prefix>/<job>/status                   | aggregator             | yes      |
| <prefix>/<job>/metrics/<device>         | device                 | no       |
| <prefix>/<job>/fleet/<device>           | aggregator (JSON)      | yes      |
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")


def check_name(kind: str, value: str) -> str:
    """Return value if it can be one topic level (no wildcards, no '/') and a file name
    (not '.' or '..'); else ValueError."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        if isinstance(value, str):  # quoted in logs and acks: never all of a hostile one
            shown = repr(value[:64]) + ("..." if len(value) > 64 else "")
        else:
            shown = type(value).__name__
        raise ValueError(
            f"{kind} {shown} must be 1-64 characters of letters, digits, '_', '.' or '-', "
            "and not '.' or '..'"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for one job under one prefix."""

    job: str
    prefix: str = "fedmq"

    def __post_init__(self) -> None:
        check_name("job", self.job)
        for level in self.prefix.split("/"):
            check_name("topic prefix level", level)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.job}"

    def global_manifest(self) -> str:
        return f"{self.base}/global"

    def global_chunk(self, version: int, index: int) -> str:
        return f"{self.base}/global/{version}/{index}"

    def global_chunks_filter(self, version: int | None = None) -> str:
        """Chunks of one version, or of every version when version is None."""
        return f"{self.base}/global/{'+' if version is None else version}/+"

    def round(self) -> str:
        return f"{self.base}/round"

    def update(self, device: str) -> str:
        return f"{self.base}/update/{check_name('device id', device)}"

    def updates_filter(self, share_group: str | None = None) -> str:
        topic = f"{self.base}/update/+"
        return f"$share/{check_name('share group', share_group)}/{topic}" if share_group else topic

    def ack(self, device: str) -> str:
        return f"{self.base}/ack/{check_name('device id', device)}"

    def acks_filter(self) -> str:
        return f"{self.base}/ack/+"

    def device_state(self, device: str) -> str:
        return f"{self.prefix}/devices/{check_name('device id', device)}/state"

    def device_states_filter(self) -> str:
        return f"{self.prefix}/devices/+/state"

    def status(self) -> str:
        return f"{self.base}/status"

    def metrics(self, device: str) -> str:
        return f"{self.base}/metrics/{check_name('device id', device)}"

    def metrics_filter(self) -> str:
        return f"{self.base}/metrics/+"

    def fleet_device(self, device: str) -> str:
        """The aggregator's readable JSON mirror of one device (retained)."""
        return f"{self.base}/fleet/{check_name('device id', device)}"

    def fleet_filter(self) -> str:
        return f"{self.base}/fleet/+"

    def kind_of(self, topic: str) -> str | None:
        """Which row of the tree a topic is: 'global', 'global_chunk', 'round', 'update', ..."""
        return self._parse(topic)[0]

    def device_of(self, topic: str) -> str | None:
        """The device id in an update, ack, metrics, fleet or state topic; None otherwise."""
        return self._parse(topic)[1]

    def _parse(self, topic: str) -> tuple[str | None, str | None]:
        levels = topic.split("/")
        base = self.base.split("/")
        if levels[: len(base)] == base:
            rest = levels[len(base) :]
            if rest == ["global"]:
                return "global", None
            if len(rest) == 3 and rest[0] == "global":
                return "global_chunk", None
            if rest in (["round"], ["status"]):
                return rest[0], None
            if len(rest) == 2 and rest[0] in ("update", "ack", "metrics", "fleet"):
                return rest[0], rest[1]
        pre = self.prefix.split("/")
        rest = levels[len(pre) :]
        if levels[: len(pre)] == pre and len(rest) == 3 and rest[::2] == ["devices", "state"]:
            return "state", rest[1]
        return None, None
