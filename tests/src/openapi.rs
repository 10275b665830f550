//! `docs/openapi.yaml` for the tests: [`Spec::load`] reads it (YAML to
//! JSON through `serde_norway`) and refuses any schema keyword outside the
//! subset [`Spec::validate`] implements, so that nothing in the spec is
//! silently not checked.
//!
//! The subset, with JSON Schema 2020-12 semantics (OpenAPI 3.1): `$ref`
//! (local, `#/...`), `type` (a name or a list), `enum`, `const`,
//! `properties`, `required`, `additionalProperties` (a boolean or a
//! schema; a schema with `properties` must state it), `items`, `oneOf`,
//! `minimum`, `maximum`; annotations (`description`, `deprecated`,
//! `title`, `default`, `examples`, `format`) and `x-` extensions are read
//! and ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

/// Keywords [`Spec::validate`] checks.
const CHECKED: &[&str] = &[
    "$ref",
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "oneOf",
    "minimum",
    "maximum",
];
/// Keywords that only annotate.
const ANNOTATIONS: &[&str] = &[
    "description",
    "deprecated",
    "title",
    "default",
    "examples",
    "format",
];

/// One operation of the spec.
///
/// Invariant: `method` is upper case; `statuses` are the keys of its
/// `responses`.
#[derive(Debug, Clone)]
pub struct Operation {
    /// The endpoint's name (the path without its leading `/`), e.g. `vm.info`.
    pub name: String,
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The statuses it documents.
    pub statuses: BTreeSet<u16>,
    /// The schema of its JSON request body, if it takes one.
    pub request: Option<Value>,
}

/// The parsed spec.
///
/// Invariant: every schema in it uses only the supported keywords and every
/// `$ref` resolves.
#[derive(Debug, Clone)]
pub struct Spec {
    doc: Value,
}

/// Where the spec lives in the repository.
pub fn spec_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.yaml")
}

impl Spec {
    /// Reads and checks `docs/openapi.yaml`; panics naming every problem.
    pub fn load() -> Spec {
        let text = std::fs::read_to_string(spec_path())
            .unwrap_or_else(|e| panic!("{}: {e}", spec_path().display()));
        Spec::parse(&text).unwrap_or_else(|e| panic!("{}:\n{}", spec_path().display(), e))
    }

    /// Parses and checks a spec given as YAML text.
    pub fn parse(text: &str) -> Result<Spec, String> {
        let doc: Value = serde_norway::from_str(text).map_err(|e| format!("YAML: {e}"))?;
        let spec = Spec { doc };
        let mut errs = Vec::new();
        let schemas = spec.doc["components"]["schemas"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (name, s) in &schemas {
            spec.lint(&format!("components.schemas.{name}"), s, &mut errs);
        }
        for (path, item) in spec.doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let at = format!("paths.{path}.{method}");
                for (i, p) in op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    spec.lint(&format!("{at}.parameters[{i}]"), &p["schema"], &mut errs);
                }
                if let Some(s) = op["requestBody"]["content"]["application/json"].get("schema") {
                    spec.lint(&format!("{at}.requestBody"), s, &mut errs);
                }
                for (code, r) in op["responses"].as_object().into_iter().flatten() {
                    match spec.resolve_response(r) {
                        Some(r) => {
                            for (ct, c) in r["content"].as_object().into_iter().flatten() {
                                spec.lint(&format!("{at}.{code}.{ct}"), &c["schema"], &mut errs);
                            }
                        }
                        None => errs.push(format!("{at}.{code}: unresolved response {r}")),
                    }
                }
            }
        }
        if errs.is_empty() {
            Ok(spec)
        } else {
            Err(errs.join("\n"))
        }
    }

    /// The whole document, as JSON.
    pub fn doc(&self) -> &Value {
        &self.doc
    }

    fn pointer(&self, r: &str) -> Option<&Value> {
        self.doc.pointer(r.strip_prefix('#')?)
    }

    fn resolve_response<'a>(&'a self, r: &'a Value) -> Option<&'a Value> {
        match r.get("$ref").and_then(Value::as_str) {
            Some(p) => self.pointer(p),
            None => Some(r),
        }
    }

    /// Checks that `s` uses only supported keywords and resolvable refs.
    fn lint(&self, at: &str, s: &Value, errs: &mut Vec<String>) {
        let Some(obj) = s.as_object() else {
            errs.push(format!("{at}: a schema must be an object, got {s}"));
            return;
        };
        for (k, v) in obj {
            if k.starts_with("x-") || ANNOTATIONS.contains(&k.as_str()) {
                continue;
            }
            if !CHECKED.contains(&k.as_str()) {
                errs.push(format!("{at}: unsupported keyword {k:?}"));
                continue;
            }
            match k.as_str() {
                "$ref" if v.as_str().and_then(|r| self.pointer(r)).is_none() => {
                    errs.push(format!("{at}: $ref {v} does not resolve"));
                }
                "properties" => {
                    for (p, ps) in v.as_object().into_iter().flatten() {
                        self.lint(&format!("{at}.{p}"), ps, errs);
                    }
                }
                "items" => self.lint(&format!("{at}[]"), v, errs),
                "additionalProperties" if v.is_object() => self.lint(&format!("{at}.*"), v, errs),
                "oneOf" => {
                    for (i, o) in v.as_array().into_iter().flatten().enumerate() {
                        self.lint(&format!("{at}.oneOf[{i}]"), o, errs);
                    }
                }
                _ => {}
            }
        }
        if obj.contains_key("properties") && !obj.contains_key("additionalProperties") {
            errs.push(format!(
                "{at}: an object schema must state additionalProperties"
            ));
        }
        if let Some(req) = obj.get("required").and_then(Value::as_array) {
            for r in req {
                let named = r
                    .as_str()
                    .is_some_and(|r| obj.get("properties").and_then(|p| p.get(r)).is_some());
                if !named {
                    errs.push(format!("{at}: required {r} is not among its properties"));
                }
            }
        }
    }

    /// The schema `components.schemas.<name>`; panics if there is none.
    pub fn schema(&self, name: &str) -> &Value {
        self.doc["components"]["schemas"]
            .get(name)
            .unwrap_or_else(|| panic!("no schema {name} in the spec"))
    }

    /// Every operation, in the spec's order.
    pub fn operations(&self) -> Vec<Operation> {
        let mut out = Vec::new();
        for (path, item) in self.doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                out.push(Operation {
                    name: path.trim_start_matches('/').to_string(),
                    method: method.to_ascii_uppercase(),
                    statuses: op["responses"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter_map(|(c, _)| c.parse().ok())
                        .collect(),
                    request: op["requestBody"]["content"]["application/json"]
                        .get("schema")
                        .cloned(),
                });
            }
        }
        out
    }

    /// The schema of the reply of `method name` with `status` (JSON, or
    /// JSON lines for `vm.events`); 404 and 405 come from
    /// `x-router-responses`. `None` if the spec does not list it.
    pub fn response_schema(&self, name: &str, method: &str, status: u16) -> Option<Value> {
        let code = status.to_string();
        let r = match self.doc["paths"][format!("/{name}")][method.to_ascii_lowercase()]
            ["responses"]
            .get(&code)
        {
            Some(r) => r,
            None => self.doc["x-router-responses"].get(&code)?,
        };
        let r = self.resolve_response(r)?;
        let content = r["content"].as_object()?;
        content
            .get("application/json")
            .or_else(|| content.get("application/x-ndjson"))
            .map(|c| c["schema"].clone())
    }

    /// Checks a reply of `method name` against the spec: its status is
    /// listed and its body fits the schema for that status.
    pub fn check_reply(
        &self,
        name: &str,
        method: &str,
        status: u16,
        body: &Value,
    ) -> Result<(), String> {
        let schema = self
            .response_schema(name, method, status)
            .ok_or_else(|| format!("{method} {name}: status {status} is not in the spec"))?;
        self.validate(&schema, body)
            .map_err(|e| format!("{method} {name} -> {status} {body}:\n{e}"))
    }

    /// Validates `v` against `schema`; the error lists every violation with
    /// its JSON path.
    pub fn validate(&self, schema: &Value, v: &Value) -> Result<(), String> {
        let mut errs = Vec::new();
        self.check(schema, v, "$", &mut errs);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("\n"))
        }
    }

    /// [`Spec::validate`] against `components.schemas.<name>`.
    pub fn validate_named(&self, name: &str, v: &Value) -> Result<(), String> {
        self.validate(self.schema(name), v)
    }

    fn check(&self, s: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
        let Some(obj) = s.as_object() else {
            errs.push(format!("{at}: bad schema {s}"));
            return;
        };
        if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
            match self.pointer(r) {
                Some(t) => self.check(t, v, at, errs),
                None => errs.push(format!("{at}: $ref {r} does not resolve")),
            }
        }
        if let Some(t) = obj.get("type") {
            let types: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            if !types.iter().any(|t| type_matches(t, v)) {
                errs.push(format!("{at}: {v} is not of type {t}"));
                return;
            }
        }
        if let Some(e) = obj.get("enum").and_then(Value::as_array) {
            if !e.contains(v) {
                errs.push(format!(
                    "{at}: {v} is not one of {}",
                    Value::Array(e.clone())
                ));
            }
        }
        if let Some(c) = obj.get("const") {
            if c != v {
                errs.push(format!("{at}: {v} is not {c}"));
            }
        }
        if let Some(x) = v.as_f64() {
            if let Some(m) = obj.get("minimum").and_then(Value::as_f64) {
                if x < m {
                    errs.push(format!("{at}: {v} is below the minimum {m}"));
                }
            }
            if let Some(m) = obj.get("maximum").and_then(Value::as_f64) {
                if x > m {
                    errs.push(format!("{at}: {v} is above the maximum {m}"));
                }
            }
        }
        if let Some(alts) = obj.get("oneOf").and_then(Value::as_array) {
            let fits = alts
                .iter()
                .filter(|a| {
                    let mut e = Vec::new();
                    self.check(a, v, at, &mut e);
                    e.is_empty()
                })
                .count();
            if fits != 1 {
                errs.push(format!(
                    "{at}: {v} fits {fits} of the oneOf alternatives, not 1"
                ));
            }
        }
        if let Some(m) = v.as_object() {
            let props = obj.get("properties").and_then(Value::as_object);
            for r in obj
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(r) = r.as_str() {
                    if !m.contains_key(r) {
                        errs.push(format!("{at}: required field {r} is missing"));
                    }
                }
            }
            let extra = obj.get("additionalProperties");
            for (k, fv) in m {
                let here = format!("{at}.{k}");
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => self.check(ps, fv, &here, errs),
                    None => match extra {
                        Some(Value::Bool(false)) => {
                            errs.push(format!("{at}: field {k} is not in the spec"))
                        }
                        Some(s @ Value::Object(_)) => self.check(s, fv, &here, errs),
                        _ => {}
                    },
                }
            }
        }
        if let (Some(items), Some(a)) = (obj.get("items"), v.as_array()) {
            for (i, x) in a.iter().enumerate() {
                self.check(items, x, &format!("{at}[{i}]"), errs);
            }
        }
    }

    /// `components.schemas.<name>.enum` as strings.
    pub fn enum_of(&self, name: &str) -> Vec<String> {
        self.schema(name)["enum"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }

    /// An `x-` map of strings to integers of schema `name` (e.g.
    /// `x-statuses` of `ErrorKind`).
    pub fn x_map(&self, name: &str, key: &str) -> BTreeMap<String, u64> {
        self.schema(name)[key]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect()
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const MINI: &str = r##"
paths: {}
components:
  schemas:
    A:
      type: object
      additionalProperties: false
      required: [n]
      properties:
        n: {type: integer, minimum: 1, maximum: 9}
        s: {type: [string, "null"], enum: [x, y, null]}
        l: {type: array, items: {$ref: "#/components/schemas/B"}}
        c: {oneOf: [{type: integer}, {const: auto}]}
    B:
      type: object
      additionalProperties: true
      properties:
        k: {const: 1}
"##;

    #[test]
    fn the_validator_checks_what_it_claims() {
        let s = Spec::parse(MINI).unwrap();
        let ok = |v: Value| s.validate_named("A", &v);
        assert_eq!(ok(json!({"n": 1})), Ok(()));
        assert_eq!(
            ok(json!({"n": 9, "s": null, "l": [{"k": 1, "other": 2}], "c": "auto"})),
            Ok(())
        );
        assert_eq!(ok(json!({"n": 3, "c": 4})), Ok(()));
        for bad in [
            json!({}),
            json!({"n": 0}),
            json!({"n": 10}),
            json!({"n": 1.5}),
            json!({"n": "1"}),
            json!({"n": 1, "s": "z"}),
            json!({"n": 1, "extra": 1}),
            json!({"n": 1, "l": [{"k": 2}]}),
            json!({"n": 1, "l": {}}),
            json!({"n": 1, "c": "manual"}),
            json!([1]),
        ] {
            assert!(ok(bad.clone()).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn the_loader_refuses_what_the_validator_would_ignore() {
        for (bad, why) in [
            ("pattern: x", "unsupported keyword"),
            ("anyOf: []", "unsupported keyword"),
            ("$ref: '#/components/schemas/Nope'", "does not resolve"),
        ] {
            let text = MINI.replace(
                "        n: {type: integer, minimum: 1, maximum: 9}",
                &format!("        n: {{type: integer, {bad}}}"),
            );
            let e = Spec::parse(&text).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let open = MINI.replace("      additionalProperties: false\n", "");
        assert!(Spec::parse(&open)
            .unwrap_err()
            .contains("must state additionalProperties"));
        let req = MINI.replace("required: [n]", "required: [n, q]");
        assert!(Spec::parse(&req).unwrap_err().contains("required"));
    }
}
