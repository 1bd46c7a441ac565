use tollgate_e2e::{User, control_plane};

#[tokio::test]
async fn smoke() {
    let cp = control_plane();
    let ns = cp.namespace("smoke").await;
    let out = cp.kubectl(User::Admin).args(["auth", "whoami", "-o", "json"]).output().unwrap();
    println!("{ns} {}", String::from_utf8_lossy(&out.stdout));
}
