//! Cache claims: one PersistentVolumeClaim per cache key, a new one cloned from the
//! default branch's.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::Api;
use sluice_core::run::RunRequest;

use super::{pod, KubeSettings};

/// The cache claim for `key`, created on first use from a copy of the default
/// branch's (`fallback`) when that exists. A cache is a speed-up: when it cannot be
/// had, the run goes on without one and says so.
pub(super) async fn ensure(
    api: &Api<PersistentVolumeClaim>,
    settings: &KubeSettings,
    key: &str,
    fallback: Option<&str>,
    req: &RunRequest,
) -> Option<String> {
    let name = pod::cache_claim_name(key);
    match api.get_opt(&name).await {
        Ok(Some(_)) => return Some(name),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(run_id = %req.run_id, error = %e, "cannot read the cache claim; running without cache");
            return None;
        }
    }
    let source = match fallback.map(pod::cache_claim_name) {
        Some(f) if f != name => match api.get_opt(&f).await {
            Ok(Some(_)) => Some(f),
            _ => None,
        },
        _ => None,
    };
    let claim = claim(settings, &name, key, source, &req.cluster);
    match api.create(&PostParams::default(), &claim).await {
        Ok(_) => Some(name),
        Err(kube::Error::Api(s)) if s.code == 409 => Some(name),
        Err(e) => {
            tracing::warn!(run_id = %req.run_id, error = %e, "cannot create the cache claim; running without cache");
            None
        }
    }
}

/// The claim `name` for `key`, a copy of `source` when given.
fn claim(
    settings: &KubeSettings,
    name: &str,
    key: &str,
    source: Option<String>,
    cluster: &str,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([
                (pod::LABEL_MANAGED_BY.to_owned(), "sluice".to_owned()),
                (pod::LABEL_CLUSTER.to_owned(), cluster.to_owned()),
            ])),
            annotations: Some(BTreeMap::from([(
                "sluice.dev/cache-key".to_owned(),
                key.to_owned(),
            )])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![settings.cache_access_mode.clone()]),
            storage_class_name: settings.cache_storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(settings.cache_size.clone()),
                )])),
                ..Default::default()
            }),
            // A new branch starts from a copy of the default branch's cache (CSI
            // volume cloning).
            data_source: source.map(|s| TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".into(),
                name: s,
            }),
            ..Default::default()
        }),
        status: None,
    }
}
