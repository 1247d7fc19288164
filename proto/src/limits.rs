//! Size limits both ends of the control-plane protocol agree on.
//!
//! An Update the control plane sends must be one the sidecar can decode: a sidecar that
//! cannot decode its Update drops the stream, reconnects, is sent the same Update again and
//! never converges. So the sidecar's decode limit and the control plane's send limit are one
//! constant, and the control plane refuses (with an error `sinewctl status` shows) to send an
//! Update past it. Labels are bounded so that one instance cannot make every Update that
//! carries it large.

/// The largest `ControlMessage` a sidecar decodes and the control plane sends (16 MiB):
/// about 3,000 endpoints with the largest labels allowed, or about 100,000 without labels,
/// in one sidecar's scope.
pub const MAX_UPDATE_BYTES: usize = 16 * 1024 * 1024;

/// At most this many labels per instance.
pub const MAX_LABELS: usize = 32;
/// A label key: 1 to this many bytes.
pub const MAX_LABEL_KEY: usize = 63;
/// A label value: at most this many bytes.
pub const MAX_LABEL_VALUE: usize = 255;
/// All keys and values of one instance together: at most this many bytes.
pub const MAX_LABELS_BYTES: usize = 4096;

/// Checks an instance's labels against the limits above; the error says which one.
pub fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), String> {
    let mut count = 0usize;
    let mut total = 0usize;
    for (key, value) in labels {
        count += 1;
        total += key.len() + value.len();
        if key.is_empty() || key.len() > MAX_LABEL_KEY {
            return Err(format!(
                "label key `{}` is {} bytes; keys are 1-{MAX_LABEL_KEY} bytes",
                key.chars().take(80).collect::<String>(),
                key.len()
            ));
        }
        if value.len() > MAX_LABEL_VALUE {
            return Err(format!(
                "label `{key}` has a value of {} bytes; values are at most {MAX_LABEL_VALUE} bytes",
                value.len()
            ));
        }
    }
    if count > MAX_LABELS {
        return Err(format!(
            "{count} labels; at most {MAX_LABELS} labels per instance"
        ));
    }
    if total > MAX_LABELS_BYTES {
        return Err(format!(
            "labels of {total} bytes (keys and values); at most {MAX_LABELS_BYTES} bytes per instance"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn labels(n: usize, key: usize, value: usize) -> HashMap<String, String> {
        (0..n)
            .map(|i| {
                let k = format!("{i:0>width$}", width = key);
                (k, "v".repeat(value))
            })
            .collect()
    }

    #[test]
    fn the_largest_labels_allowed_pass_and_one_more_byte_does_not() {
        // 32 labels of 63 + 65 bytes: exactly 4096 bytes.
        let largest = labels(MAX_LABELS, MAX_LABEL_KEY, 65);
        assert_eq!(check_labels(&largest), Ok(()));
        let mut over = largest.clone();
        let key = over.keys().next().unwrap().clone();
        over.insert(key, "v".repeat(66));
        assert!(
            check_labels(&over)
                .unwrap_err()
                .contains("at most 4096 bytes")
        );
        assert!(
            check_labels(&labels(MAX_LABELS + 1, 2, 1))
                .unwrap_err()
                .contains("at most 32 labels")
        );
        assert!(
            check_labels(&labels(1, MAX_LABEL_KEY + 1, 1))
                .unwrap_err()
                .contains("keys are 1-63 bytes")
        );
        assert!(
            check_labels(&labels(1, 3, MAX_LABEL_VALUE + 1))
                .unwrap_err()
                .contains("values are at most 255 bytes")
        );
        let empty_key: HashMap<String, String> = [(String::new(), "x".to_string())].into();
        assert!(check_labels(&empty_key).is_err());
    }
}
