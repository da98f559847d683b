"""Validates vmwatch-master's OpenAPI document (openapi-spec-validator) and real responses
against it (jsonschema, draft 2020-12, the dialect of OpenAPI 3.1).

stdin: {"document": {...}, "responses": [{"method": "get", "path": "/api/v1/vms",
        "status": 200, "body": ...}, ...]}
A response whose "path" is null (an unknown route) must be the Error schema; one with
"webhook": true is a body the panel received, checked against webhooks.journalEntry.
stdout: one line per response checked; exit 1 with the reasons if anything is wrong.
"""
import json
import sys

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

data = json.load(sys.stdin)
doc = data["document"]
validate(doc)
print("document: valid OpenAPI", doc["openapi"])

def check(where, schema, body):
    root = dict(schema)
    root["components"] = doc.get("components", {})
    errors = sorted(Draft202012Validator(root).iter_errors(body), key=lambda e: list(e.path))
    for e in errors[:5]:
        problems.append("%s: %s at %s" % (where, e.message, "/".join(map(str, e.path))))
    if not errors:
        print(where + ": ok")


problems = []
for r in data["responses"]:
    if r.get("webhook"):
        hook = doc["webhooks"]["journalEntry"]["post"]["requestBody"]["content"]["application/json"]
        check("webhook body (%s)" % type(r["body"]).__name__, hook["schema"], r["body"])
        continue
    where = "%s %s %s" % (r["method"].upper(), r["path"], r["status"])
    if r["path"] is None:
        if r.get("content_type") != "application/json":
            problems.append(where + ": unknown route answered %s, not JSON" % r.get("content_type"))
            continue
        check(where + " (unknown route)", {"$ref": "#/components/schemas/Error"}, r["body"])
        continue
    op = doc["paths"].get(r["path"], {}).get(r["method"])
    if op is None:
        problems.append(where + ": no such operation in the document")
        continue
    resp = op["responses"].get(str(r["status"]))
    if resp is None:
        problems.append(where + ": status not documented")
        continue
    content = resp.get("content", {})
    media = r.get("content_type", "application/json")
    if media not in content:
        problems.append(where + ": content type %s not documented (%s)" % (media, list(content)))
        continue
    schema = content[media].get("schema")
    if schema is None or media != "application/json":
        print(where + ": ok (" + media + ")")
        continue
    root = dict(schema)
    root["components"] = doc.get("components", {})
    errors = sorted(Draft202012Validator(root).iter_errors(r["body"]), key=lambda e: list(e.path))
    if errors:
        for e in errors[:5]:
            problems.append("%s: %s at %s" % (where, e.message, "/".join(map(str, e.path))))
    else:
        print(where + ": ok")

if problems:
    print("\n".join(problems))
    sys.exit(1)
