"""Subject router: sends each event only to the destinations configured for
its subject.

Config: one entry per rule, `route.<subject prefix> = "<destination>,..."`,
e.g. `"route.alerts/" = "cloud-a,cloud-b"`. The longest matching prefix
wins; events that match no rule are kept for every destination.
"""

import router
import wit_world
from wit_world.imports import config, log
from wit_world.imports.types import Batch, Verdict, Verdict_Keep, Verdict_Route

_routes = None


def _load_routes():
    """Reads the rules once: the config table is fixed for an instance's life."""
    global _routes
    if _routes is None:
        try:
            _routes = router.parse_routes(config.entries())
        except router.ConfigError as e:
            log.log(log.Level.ERROR, "invalid plugin config", [("error", str(e))])
            raise
        log.log(log.Level.INFO, "subject router ready", [("rules", str(len(_routes)))])
    return _routes


class WitWorld(wit_world.WitWorld):
    def filter(self, events: Batch) -> list[Verdict]:
        # The events stay in the host; only each one's subject is read.
        routes = _load_routes()
        verdicts: list[Verdict] = []
        for i in range(events.len()):
            names = router.destinations(routes, events.subject(i))
            verdicts.append(Verdict_Keep() if names is None else Verdict_Route(names))
        return verdicts
