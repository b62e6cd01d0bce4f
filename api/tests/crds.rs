//! The CRDs checked in under `crds/` are exactly what the types generate.

#[test]
fn checked_in_crds_match_the_types() {
    let root = std::path::Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("..");
    for dir in ["crds", "charts/lakecache/crds"] {
        for (file, crd) in lakecache_api::crds() {
            let want = lakecache_api::crd_yaml(&crd);
            let have = std::fs::read_to_string(root.join(dir).join(file)).unwrap_or_default();
            assert!(
                have == want,
                "{dir}/{file} is out of date: run `cargo run -p lakecache-api --bin crdgen` and commit the result"
            );
        }
    }
}

#[test]
fn every_field_has_a_description() {
    fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
        let Some(props) = v.get("properties").and_then(|p| p.as_object()) else {
            if let Some(items) = v.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
            return;
        };
        for (k, p) in props {
            let here = format!("{path}.{k}");
            // metadata, apiVersion and kind are Kubernetes' own.
            if !matches!(here.as_str(), ".metadata" | ".apiVersion" | ".kind")
                && p.get("description").is_none()
            {
                missing.push(here.clone());
            }
            // Kubernetes' own types (affinity, resources, …) describe themselves.
            if !here.starts_with(".spec.workers.")
                || matches!(
                    here.as_str(),
                    ".spec.workers.replicas" | ".spec.workers.port"
                )
            {
                walk(&here, p, missing);
            }
        }
    }
    for (file, crd) in lakecache_api::crds() {
        let v = serde_json::to_value(&crd).unwrap();
        let schema = &v["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = vec![];
        walk("", schema, &mut missing);
        // Conditions are Kubernetes' metav1.Condition, described by their own schema.
        missing.retain(|m| !m.contains(".conditions[]."));
        assert!(
            missing.is_empty(),
            "{file}: fields without a description: {missing:#?}"
        );
    }
}
