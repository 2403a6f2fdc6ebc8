"""Routing rules of the subject router, kept free of the WIT bindings so they
test with plain `python3 -m unittest` on the host."""

from typing import Dict, Iterable, List, Optional, Tuple

ROUTE_PREFIX = "route."


class ConfigError(ValueError):
    """A config entry the router cannot use; names the key."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"config key `{key}` {reason}")
        self.key = key


def parse_routes(entries: Iterable[Tuple[str, str]]) -> Dict[str, List[str]]:
    """Subject prefix -> destinations, from `route.<prefix> = "a,b"` entries."""
    routes = {}
    for key, value in entries:
        if not key.startswith(ROUTE_PREFIX):
            continue
        prefix = key[len(ROUTE_PREFIX):]
        destinations = [d.strip() for d in value.split(",") if d.strip()]
        if not prefix:
            raise ConfigError(key, "needs a subject prefix after `route.`")
        if not destinations:
            raise ConfigError(key, "must name at least one destination")
        routes[prefix] = destinations
    return routes


def destinations(routes: Dict[str, List[str]], subject: str) -> Optional[List[str]]:
    """Destinations of the longest prefix matching `subject`; None if no rule matches."""
    best = None
    for prefix, names in routes.items():
        if subject.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else routes[best]
