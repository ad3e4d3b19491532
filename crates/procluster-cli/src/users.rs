//! `--user` and `--group`: names or numbers, looked up in /etc/passwd and
//! /etc/group.

/// The uid and gid workers switch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Identity, String> {
    if user.is_none() && group.is_none() {
        return Ok(Identity {
            uid: None,
            gid: None,
        });
    }
    if !rustix::process::geteuid().is_root() {
        return Err("--user and --group need procluster to run as root".into());
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let (uid, user_gid) = match user {
        None => (None, None),
        Some(user) => {
            let (uid, gid) =
                lookup_user(&passwd, user).ok_or_else(|| format!("--user {user}: no such user"))?;
            (Some(uid), gid)
        }
    };
    let gid = match group {
        Some(group) => Some(
            lookup_group(&groups, group)
                .ok_or_else(|| format!("--group {group}: no such group"))?,
        ),
        None => user_gid,
    };
    Ok(Identity { uid, gid })
}

/// `(uid, primary gid)` for a name or a number (a number need not exist).
pub fn lookup_user(passwd: &str, user: &str) -> Option<(u32, Option<u32>)> {
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && (f[0] == user || f[2] == user));
    match entry {
        Some(f) => Some((f[2].parse().ok()?, f[3].parse().ok())),
        None => user.parse().ok().map(|uid| (uid, None)),
    }
}

pub fn lookup_group(groups: &str, group: &str) -> Option<u32> {
    let entry = groups
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && (f[0] == group || f[2] == group));
    match entry {
        Some(f) => f[2].parse().ok(),
        None => group.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";

    #[test]
    fn names_and_numbers() {
        assert_eq!(lookup_user(PASSWD, "nobody"), Some((65534, Some(65534))));
        assert_eq!(lookup_user(PASSWD, "1234"), Some((1234, None)));
        assert_eq!(lookup_user(PASSWD, "ghost"), None);
        assert_eq!(lookup_group(GROUP, "nogroup"), Some(65534));
        assert_eq!(lookup_group(GROUP, "77"), Some(77));
        assert_eq!(lookup_group(GROUP, "ghosts"), None);
    }
}
