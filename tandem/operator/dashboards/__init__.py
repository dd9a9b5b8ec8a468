"""Grafana dashboards and Prometheus rules as code (grafana-foundation-sdk; a development dependency).

queries.py says what each panel shows, layout.py where it sits, rules.py the recording and alert rules,
build.py writes the JSON and YAML that the chart ships. `python -m tandem.operator.dashboards` regenerates.
"""
