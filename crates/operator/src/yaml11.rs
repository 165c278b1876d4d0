//! YAML for Kubernetes tools, which read YAML 1.1: there `off`, `on`, `yes` and `no` are booleans, so
//! a plain `off` (an enum value of `verify.mode`) would reach the API server as `false`. Every string
//! here is written double-quoted (JSON's escaping is valid YAML), so nothing is reinterpreted.

use std::fmt::Write;

use serde_json::Value;

pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0, false);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => serde_json::to_string(text).unwrap_or_default(),
        other => other.to_string(),
    }
}

/// Writes `value`; `inline` means the cursor is after `key:` or `- ` on the current line.
fn write_value(out: &mut String, value: &Value, indent: usize, inline: bool) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if map.is_empty() => out.push_str(if inline { " {}\n" } else { "{}\n" }),
        Value::Array(items) if items.is_empty() => out.push_str(if inline { " []\n" } else { "[]\n" }),
        Value::Object(map) => {
            if inline {
                out.push('\n');
            }
            for (key, item) in map {
                let _ = write!(out, "{pad}{}:", scalar(&Value::String(key.clone())));
                write_value(out, item, indent + 2, true);
            }
        }
        Value::Array(items) => {
            if inline {
                out.push('\n');
            }
            for item in items {
                let _ = write!(out, "{pad}-");
                match item {
                    Value::Object(map) if !map.is_empty() => {
                        // The first key shares the dash's line; the rest align under it.
                        let mut first = true;
                        for (key, inner) in map {
                            let prefix = if first { " ".to_string() } else { " ".repeat(indent + 2) };
                            first = false;
                            let _ = write!(out, "{prefix}{}:", scalar(&Value::String(key.clone())));
                            write_value(out, inner, indent + 4, true);
                        }
                    }
                    other => write_value(out, other, indent + 2, true),
                }
            }
        }
        other => {
            let _ = writeln!(out, "{}{}", if inline { " " } else { "" }, scalar(other));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_are_quoted_and_the_structure_round_trips() {
        let value = json!({
            "mode": "off", "enum": ["off", "log", "enforce"], "n": 3, "ok": true, "empty": {}, "none": [],
            "nested": {"list": [{"a": "yes", "b": {"c": "x\\ny \"q\""}}, [1, 2], "on"]}
        });
        let text = to_string(&value);
        assert!(text.contains("\"mode\": \"off\""), "{text}");
        let back: Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(back, value, "{text}");
    }
}
