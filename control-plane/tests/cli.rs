//! `sinewctl` as a user runs it: the real binary against a control plane on 127.0.0.1:0
//! (in-process, with real gRPC), asserting what it prints, not only its exit code.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use sinew_control::RunningControl;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `sinewctl --control ADDR --token-file DIR/admin-token ARGS`.
fn sinewctl(control: &RunningControl, dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sinewctl"))
        .arg("--control")
        .arg(control.grpc_addr.to_string())
        .arg("--token-file")
        .arg(dir.join("admin-token"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn out(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn err(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Issue 18, item 1: references to services that have neither policy nor instances are
/// warned about (document and field named), refused with `--strict`; an empty input says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_warns_about_unknown_services_and_strict_refuses() {
    let dir = temp_dir("cli-warn");
    let control = start(&dir, Duration::from_secs(10)).await;
    // `web` has an instance but no policy: a reference to it is fine.
    let mut web = Sidecar::connect(&control, hello("web-1", "web"))
        .await
        .unwrap();
    let _ = web.next_update().await;

    let typo = write(
        &dir,
        "typo.yaml",
        "kind: Service\nname: orders\nspec: {allow: [web, webb]}\n---\n\
         kind: Subscription\nname: ghost-orders\nspec: {topic: order.created, service: ghost}\n",
    );
    let strict = sinewctl(&control, &dir, &["apply", "-f", s(&typo), "--strict"]);
    assert!(!strict.status.success());
    assert_eq!(
        err(&strict),
        "error: refused (--strict), nothing applied:\n\
         document 1 (Service orders): spec.allow[1]: service `webb` has no policy and no instances (a typo?)\n\
         document 2 (Subscription ghost-orders): spec.service: service `ghost` has no policy and no instances (a typo?)\n"
    );
    assert_eq!(out(&strict), "");
    let nothing = sinewctl(&control, &dir, &["get", "policy"]);
    assert_eq!(out(&nothing), "no policy documents\n", "{}", err(&nothing));

    let applied = sinewctl(&control, &dir, &["apply", "-f", s(&typo)]);
    assert!(applied.status.success(), "{}", err(&applied));
    assert_eq!(
        err(&applied),
        "warning: document 1 (Service orders): spec.allow[1]: service `webb` has no policy and no instances (a typo?)\n\
         warning: document 2 (Subscription ghost-orders): spec.service: service `ghost` has no policy and no instances (a typo?)\n"
    );
    let version = control_version(&control, &dir);
    assert_eq!(
        out(&applied),
        format!("service/orders created\nsubscription/ghost-orders created\nversion {version}\n")
    );

    // A service defined in the same input, or already applied, is known.
    let fixed = write(
        &dir,
        "fixed.yaml",
        "kind: Service\nname: orders\nspec: {allow: [web, billing]}\n---\n\
         kind: Service\nname: billing\nspec: {calls: [orders]}\n",
    );
    let clean = sinewctl(&control, &dir, &["apply", "-f", s(&fixed), "--strict"]);
    assert!(clean.status.success(), "{}", err(&clean));
    assert_eq!(err(&clean), "");

    let empty = write(&dir, "empty.yaml", "# nothing yet\n---\n");
    let nothing = sinewctl(&control, &dir, &["apply", "-f", s(&empty)]);
    assert!(nothing.status.success());
    assert_eq!(
        out(&nothing),
        format!("nothing to apply: {} holds no documents\n", empty.display())
    );

    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

fn control_version(control: &RunningControl, dir: &Path) -> String {
    let status = out(&sinewctl(control, dir, &["status"]));
    status
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("version "))
        .map(|v| v.split(' ').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no version line in {status}"))
}

/// Issue 18, item 2: `get policy` shows every kind and finds a document by name whatever its
/// kind; `apply --dry-run` and `diff` show what would change and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_policy_shows_every_kind_and_dry_run_and_diff_change_nothing() {
    let dir = temp_dir("cli-get");
    let control = start(&dir, Duration::from_secs(10)).await;
    let policy = write(
        &dir,
        "policy.yaml",
        "kind: Service\nname: billing\nspec: {timeout: 2s}\n---\n\
         kind: Subscription\nname: billing-orders\nspec: {topic: order.created, service: billing}\n",
    );
    let applied = sinewctl(&control, &dir, &["apply", "-f", s(&policy)]);
    assert!(applied.status.success(), "{}", err(&applied));

    let all = out(&sinewctl(&control, &dir, &["get", "policy"]));
    assert!(
        all.starts_with("kind: Service\nname: billing\n")
            && all.contains("---\nkind: Subscription\nname: billing-orders\n"),
        "{all}"
    );
    let one = sinewctl(&control, &dir, &["get", "policy", "billing-orders"]);
    assert!(one.status.success(), "{}", err(&one));
    assert!(
        out(&one).starts_with("kind: Subscription\nname: billing-orders\nspec:\n  topic: order.created\n  service: billing\n"),
        "{}",
        out(&one)
    );
    let subs = out(&sinewctl(&control, &dir, &["get", "subscriptions"]));
    assert_eq!(subs, out(&one));
    let missing = sinewctl(&control, &dir, &["get", "policy", "nope"]);
    assert!(!missing.status.success());
    assert_eq!(err(&missing), "error: no policy document named `nope`\n");

    // Unchanged: `diff` says so and exits 0.
    let same = sinewctl(&control, &dir, &["diff", "-f", s(&policy)]);
    assert_eq!(same.status.code(), Some(0), "{}", err(&same));
    assert_eq!(out(&same), "no differences\n");

    let edited = write(
        &dir,
        "edited.yaml",
        "kind: Service\nname: billing\nspec: {timeout: 3s}\n---\nkind: Service\nname: web\n",
    );
    let diff = sinewctl(&control, &dir, &["diff", "-f", s(&edited)]);
    assert_eq!(diff.status.code(), Some(1), "{}", err(&diff));
    let text = out(&diff);
    let edited_name = edited.display();
    assert!(
        text.starts_with(&format!(
            "--- live Service billing\n+++ {edited_name} Service billing\n kind: Service\n name: billing\n spec:\n-  timeout: 2s\n+  timeout: 3s\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "--- live Service web (none)\n+++ {edited_name} Service web\n+kind: Service\n+name: web\n"
        )),
        "{text}"
    );

    let version = control_version(&control, &dir);
    let dry = sinewctl(&control, &dir, &["apply", "-f", s(&edited), "--dry-run"]);
    assert!(dry.status.success(), "{}", err(&dry));
    let dry_text = out(&dry);
    assert!(
        dry_text.starts_with("service/billing changed (dry run)\nservice/web created (dry run)\n--- live Service billing\n"),
        "{dry_text}"
    );
    assert!(
        dry_text.ends_with(&format!("dry run: nothing changed (version {version})\n")),
        "{dry_text}"
    );
    assert_eq!(control_version(&control, &dir), version);
    assert!(out(&sinewctl(&control, &dir, &["get", "policy", "billing"])).contains("timeout: 2s"));

    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 18, item 3: a control plane started with `--policy` takes its policy from the files
/// only; `apply` and `delete` are refused naming the file, and `status` says where policy
/// comes from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_with_policy_files_refuses_apply_and_delete() {
    let dir = temp_dir("cli-gitops");
    let file = write(&dir, "mesh-policy.yaml", "kind: Service\nname: orders\n");
    let config = sinew_control::Config {
        policy: Some(file.clone()),
        ..sinew_control::Config::local(&dir)
    };
    let control = sinew_control::serve(config).await.unwrap();

    let other = write(
        &dir,
        "other.yaml",
        "kind: Service\nname: orders\nspec: {timeout: 1s}\n",
    );
    let refused = sinewctl(&control, &dir, &["apply", "-f", s(&other)]);
    assert!(!refused.status.success());
    let expected = format!(
        "error: this control plane takes its policy from {} (sinew-control --policy): edit it there \
         (it is reloaded within a second); `apply` and `delete` work only on a control plane \
         started without --policy\n",
        file.display()
    );
    assert_eq!(err(&refused), expected);
    let refused = sinewctl(&control, &dir, &["delete", "service", "orders"]);
    assert!(!refused.status.success());
    assert_eq!(err(&refused), expected);

    // A dry run still compares, and says a real apply would be refused.
    let dry = out(&sinewctl(
        &control,
        &dir,
        &["apply", "-f", s(&other), "--dry-run"],
    ));
    assert!(
        dry.ends_with(&format!(
            "note: this control plane takes its policy from {}: apply would be refused there\n",
            file.display()
        )),
        "{dry}"
    );

    let status = out(&sinewctl(&control, &dir, &["status"]));
    assert!(
        status.starts_with(&format!(
            "version 1\npolicy from {} (edit the files there; apply and delete are refused)\n\nno sidecars\n",
            file.display()
        )),
        "{status}"
    );
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 18, item 5: `status` explains the version jump after a restart; a lower-case kind is
/// refused with a hint; an empty answer (`no dead letters`, `no sidecars`) goes to stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_explains_the_version_jump_and_kinds_are_case_sensitive() {
    let dir = temp_dir("cli-restart");
    let control = start(&dir, Duration::from_secs(10)).await;
    let lower = write(&dir, "lower.yaml", "kind: service\nname: orders\n");
    let refused = sinewctl(&control, &dir, &["apply", "-f", s(&lower)]);
    assert!(!refused.status.success());
    assert_eq!(
        err(&refused),
        "error: document 1 (service orders): kind: unknown kind `service`: kinds are case-sensitive and singular; did you mean Service?\n"
    );
    let good = write(&dir, "good.yaml", "kind: Service\nname: orders\n");
    assert!(
        sinewctl(&control, &dir, &["apply", "-f", s(&good)])
            .status
            .success()
    );
    let before = out(&sinewctl(&control, &dir, &["status"]));
    assert_eq!(
        before,
        "version 1\npolicy from sinewctl apply\n\nno sidecars\n"
    );
    control.shutdown().await.unwrap();

    let control = start(&dir, Duration::from_secs(10)).await;
    let after = out(&sinewctl(&control, &dir, &["status"]));
    assert_eq!(
        after,
        "version 1001 (started at 1001 after a restart: versions are reserved in blocks of 1000, \
         so a restarted control plane continues past the last block and never reuses one)\n\
         policy from sinewctl apply\n\nno sidecars\n"
    );
    let services = sinewctl(&control, &dir, &["get", "services"]);
    assert!(out(&services).starts_with("SERVICE   POLICY   INSTANCES\norders    yes      -\n"));
    let none = sinewctl(&control, &dir, &["events", "dead-letters"]);
    assert!(none.status.success(), "{}", err(&none));
    assert_eq!(out(&none), "no dead letters\n");
    control.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
