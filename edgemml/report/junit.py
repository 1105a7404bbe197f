"""junit.xml: one test case per gate row, so CI systems (GitHub, GitLab, Jenkins) list failures
natively, with the limit and the measured value in the failure message."""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree as ET

from edgemml.report.gates import fmt, required_failures


def render_junit(report: dict[str, Any]) -> str:
    rows = report.get("gates", [])
    suite = ET.Element("testsuite", {
        "name": f"edgemml.validate.{report.get('pipeline', '')}",
        "tests": str(len(rows)),
        "failures": str(required_failures(rows)),
        "skipped": str(sum(r["status"] == "skip" or (r["status"] == "fail"
                                                      and not r.get("required", True))
                           for r in rows)),
        "errors": "0", "time": "0",
        "timestamp": str(report.get("created", ""))})
    for r in rows:
        case = ET.SubElement(suite, "testcase", {
            "classname": f"edgemml.gates.{r['artifact'] or r['selector']}",
            "name": r["gate"], "time": "0"})
        unit = f" {r['unit']}" if r.get("unit") else ""
        text = (f"{r['artifact'] or r['selector']}: {r['metric']} = {fmt(r['value'])}{unit}, "
                f"limit {r['op']} {fmt(r['limit'])}{unit}"
                + (f"; {r['message']}" if r.get("message") else ""))
        if r["status"] == "fail" and not r.get("required", True):
            ET.SubElement(case, "skipped", {"message": f"not required (require: chosen; another "
                                                       f"artifact was chosen): {text}"})
        elif r["status"] == "fail":
            ET.SubElement(case, "failure", {"message": text, "type": "GateFailed"}).text = text
        elif r["status"] == "skip":
            ET.SubElement(case, "skipped", {"message": text})
        else:
            ET.SubElement(case, "system-out").text = text
    root = ET.Element("testsuites", {"name": "edgemml", "tests": suite.get("tests", "0"),
                                     "failures": suite.get("failures", "0")})
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
