//! Schema fragments that derive macros cannot express: Kubernetes list semantics (which decide
//! how server-side apply merges a list and let the apiserver refuse duplicate keys) and
//! free-form JSON.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

/// A list whose items are unique by `key`; duplicates are refused by the apiserver and
/// server-side apply merges items by that key.
fn list_map<T: JsonSchema>(generator: &mut SchemaGenerator, key: &str, max_items: u64) -> Schema {
    let items = generator.subschema_for::<T>();
    json_schema!({
        "type": "array",
        "items": items,
        "maxItems": max_items,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": [key],
    })
}

/// A list of unique strings.
fn string_set(max_items: u64, max_length: u64) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": max_length},
        "maxItems": max_items,
        "x-kubernetes-list-type": "set",
    })
}

pub(crate) fn conditions(generator: &mut SchemaGenerator) -> Schema {
    list_map::<Condition>(generator, "type", 16)
}

pub(crate) fn allowed_tools(generator: &mut SchemaGenerator) -> Schema {
    list_map::<crate::policy::AllowedTool>(generator, "name", crate::policy::MAX_TOOLS)
}

pub(crate) fn upstreams(generator: &mut SchemaGenerator) -> Schema {
    list_map::<crate::policy::Upstream>(generator, "name", 64)
}

pub(crate) fn credentials(generator: &mut SchemaGenerator) -> Schema {
    list_map::<crate::identity::ToolCredential>(generator, "upstream", 64)
}

pub(crate) fn tool_statuses(generator: &mut SchemaGenerator) -> Schema {
    list_map::<crate::policy::ToolStatus>(generator, "name", crate::policy::MAX_TOOLS)
}

pub(crate) fn tool_name_set(_: &mut SchemaGenerator) -> Schema {
    string_set(crate::policy::MAX_TOOLS, crate::policy::MAX_TOOL_NAME)
}

pub(crate) fn model_set(_: &mut SchemaGenerator) -> Schema {
    let mut schema = string_set(64, 256);
    schema.insert("minItems".into(), 1.into());
    schema
}

pub(crate) fn name_set(_: &mut SchemaGenerator) -> Schema {
    string_set(64, 253)
}

pub(crate) fn label_set(_: &mut SchemaGenerator) -> Schema {
    string_set(32, 253)
}

/// Arbitrary JSON kept as written (tool arguments). The apiserver stores it without pruning.
pub(crate) fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}
