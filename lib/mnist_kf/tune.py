"""Hyperparameter tuning with Katib's Experiment manifest: on a cluster through the Katib
SDK, or locally by an executor that follows Katib's rules."""

from __future__ import annotations

import re
from typing import Iterator

# Katib's default StdOut metrics filter (pkg/metricscollector/v1beta1/common).
KATIB_DEFAULT_METRICS_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"


def parse_metrics(line: str, metrics_filter: str = KATIB_DEFAULT_METRICS_FILTER) -> Iterator[tuple[str, float]]:
    """(name, value) pairs that Katib's StdOut collector would take from one line of output."""
    for match in re.finditer(metrics_filter, line):
        name, value = match.group(1), match.group(2)
        try:
            yield name, float(value)
        except ValueError:  # the filter also matches "name=" with no digits
            continue
