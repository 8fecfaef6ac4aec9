"""Policy what-if: the same observation judged under a baseline policy and the proposed one.

For a reviewer of a threshold change: which shards would now split or merge, and which no
longer would, each with the evidence under the policy that decides it. Pure: two desired
states and one observation in, a frozen comparison out.
"""

from __future__ import annotations

from engine.config.loader import Desired
from engine.detect.backtest import compare_policies
from engine.observe.models import Observation
from engine.plan.load_rules import assessments
from engine.plan.models import PolicyWhatIf, WhatIfChange, WhatIfKind


def compare(baseline: Desired, proposed: Desired, observation: Observation, label: str) -> PolicyWhatIf:
    old = assessments(baseline, observation)
    new = assessments(proposed, observation)
    changes: list[WhatIfChange] = []
    hot_both = cold_both = 0
    for shard in sorted(set(old) | set(new)):
        before = old[shard].state if shard in old else "normal"
        after = new[shard].state if shard in new else "normal"
        address = f"shard.{shard}"
        pairs: tuple[tuple[str, WhatIfKind, WhatIfKind], ...] = (
            ("hot", "now_split", "no_longer_split"), ("cold", "now_merge", "no_longer_merge"))
        for state, now, gone in pairs:
            if after == state and before != state:
                changes.append(
                    WhatIfChange(address=address, change=now, evidence=new[shard].evidence, under="proposed")
                )
            elif before == state and after != state:
                evidence = tuple(e.model_copy(update={"policy_location": f"{label}:{e.policy_location}"})
                                 for e in old[shard].evidence)
                changes.append(WhatIfChange(address=address, change=gone, evidence=evidence, under="baseline"))
            elif before == after == state:
                if state == "hot":
                    hot_both += 1
                else:
                    cold_both += 1
    backtest = compare_policies(observation.hourly,
                                {n: d.effective_policy for n, d in baseline.databases.items()},
                                {n: d.effective_policy for n, d in proposed.databases.items()}, observation.moves)
    return PolicyWhatIf(baseline=label, metrics_source=observation.metrics_source, changes=tuple(changes),
                        hot_both=hot_both, cold_both=cold_both, backtest=tuple(backtest))
