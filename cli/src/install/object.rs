//! The objects an install applies: typed k8s-openapi values, one variant per kind, so
//! rendering is checked against the API's types and applying is one generic path.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, DynamicObject};

macro_rules! objects {
    ($($kind:ident),* $(,)?) => {
        /// One object of the install.
        #[derive(Debug, Clone, PartialEq)]
        #[allow(clippy::enum_variant_names)] // KEDA's kind is ScaledObject
        pub enum Object {
            $($kind(Box<$kind>),)*
        }

        impl Object {
            pub fn meta(&self) -> &ObjectMeta {
                match self {
                    $(Object::$kind(o) => &o.metadata,)*
                }
            }

            /// The kind, e.g. `Deployment`.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Object::$kind(_) => <$kind as k8s_openapi::Resource>::KIND,)*
                }
            }

            /// How to reach objects of this kind through the API.
            pub fn api_resource(&self) -> ApiResource {
                match self {
                    $(Object::$kind(_) => ApiResource::erase::<$kind>(&()),)*
                }
            }

            /// The object as JSON, `apiVersion` and `kind` included.
            pub fn to_json(&self) -> serde_json::Value {
                match self {
                    $(Object::$kind(o) => serde_json::to_value(o.as_ref()),)*
                }
                .expect("a k8s-openapi object serializes")
            }

            /// The object as one YAML document (without the `---`).
            pub fn to_yaml(&self) -> String {
                match self {
                    $(Object::$kind(o) => serde_saphyr::to_string(o.as_ref()),)*
                }
                .expect("a k8s-openapi object serializes")
            }
        }

        $(
            impl From<$kind> for Object {
                fn from(o: $kind) -> Object {
                    Object::$kind(Box::new(o))
                }
            }
        )*

        /// Every kind the install applies or removes, in apply order.
        pub fn all_kinds() -> Vec<ApiResource> {
            vec![$(ApiResource::erase::<$kind>(&()),)*]
        }
    };
}

objects!(
    Namespace,
    ServiceAccount,
    Role,
    RoleBinding,
    ConfigMap,
    Secret,
    Service,
    NetworkPolicy,
    PodDisruptionBudget,
    StatefulSet,
    Job,
    Deployment,
    Ingress,
    ScaledObject,
);

/// KEDA's `ScaledObject` (keda.sh/v1alpha1). k8s-openapi has no type for it, so the
/// spec stays JSON; the render tests validate it against KEDA's own CRD schema.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct ScaledObject {
    pub metadata: ObjectMeta,
    pub spec: serde_json::Value,
}

impl k8s_openapi::Resource for ScaledObject {
    const API_VERSION: &'static str = "keda.sh/v1alpha1";
    const GROUP: &'static str = "keda.sh";
    const KIND: &'static str = "ScaledObject";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "scaledobjects";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for ScaledObject {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl serde::Serialize for ScaledObject {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use k8s_openapi::Resource;
        use serde::ser::SerializeStruct;
        let mut out = s.serialize_struct("ScaledObject", 4)?;
        out.serialize_field("apiVersion", Self::API_VERSION)?;
        out.serialize_field("kind", Self::KIND)?;
        out.serialize_field("metadata", &self.metadata)?;
        out.serialize_field("spec", &self.spec)?;
        out.end()
    }
}

impl Object {
    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.meta().namespace.as_deref()
    }

    /// `Kind/name`, as kubectl prints it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }

    /// The object for kube's dynamic API.
    pub fn to_dynamic(&self) -> DynamicObject {
        serde_json::from_value(self.to_json()).expect("a k8s-openapi object is a DynamicObject")
    }

    /// The resource name in RBAC terms (`deployments`).
    pub fn plural(&self) -> String {
        self.api_resource().plural
    }

    pub fn group(&self) -> String {
        self.api_resource().group
    }
}

/// A typed object from JSON. The JSON is what the renderer writes; in tests the typed
/// value must serialize back to exactly it, so a misspelt or misplaced field (which
/// the types would drop) fails at once.
pub fn typed<T>(value: serde_json::Value) -> T
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = match serde_json::from_value(value.clone()) {
        Ok(t) => t,
        Err(e) => panic!("rendered object does not fit its type: {e}\n{value:#}"),
    };
    if cfg!(test) {
        let back = serde_json::to_value(&typed).expect("serialize");
        if let Some(path) = first_difference(&value, &back, String::new()) {
            panic!("the type dropped or changed {path} of\n{value:#}");
        }
    }
    typed
}

/// Where two JSON values first differ, as a path.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.keys()
                .chain(y.keys())
                .find_map(|k| match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => first_difference(p, q, format!("{at}.{k}")),
                    _ => Some(format!("{at}.{k}")),
                })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, format!("{at}[{i}]"))),
        _ => (a != b).then_some(at),
    }
}

/// The objects as a multi-document YAML stream.
pub fn to_yaml_stream(objects: &[Object]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&o.to_yaml());
    }
    out
}
