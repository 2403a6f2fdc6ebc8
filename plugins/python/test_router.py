import unittest

import router


class RouterTest(unittest.TestCase):
    def test_longest_matching_prefix_wins(self):
        routes = router.parse_routes(
            [("route.telemetry/", "cloud-a"), ("route.telemetry/raw/", "archive, cloud-b"), ("other", "x")]
        )
        self.assertEqual(router.destinations(routes, "telemetry/temp"), ["cloud-a"])
        self.assertEqual(router.destinations(routes, "telemetry/raw/adc"), ["archive", "cloud-b"])

    def test_unmatched_subjects_have_no_rule(self):
        routes = router.parse_routes([("route.alerts/", "cloud-a")])
        self.assertIsNone(router.destinations(routes, "telemetry/temp"))

    def test_rules_need_a_prefix_and_a_destination(self):
        with self.assertRaises(router.ConfigError) as e:
            router.parse_routes([("route.", "cloud-a")])
        self.assertEqual(e.exception.key, "route.")
        with self.assertRaises(router.ConfigError):
            router.parse_routes([("route.alerts/", " , ")])


if __name__ == "__main__":
    unittest.main()
