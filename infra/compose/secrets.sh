# shellcheck shell=sh
# Sourced by the start scripts of infra/docker-compose.yml and infra/k8s/: with SSLFLOW_SECRETS_DIR
# (Kubernetes mounts the `sslflow-secrets` Secret there, one file per key, mode 0400) every file
# named like a variable becomes that variable, unless the environment already sets it (compose
# passes the env file's values as variables). Values never go on a command line.
if [ -n "${SSLFLOW_SECRETS_DIR:-}" ] && [ -d "$SSLFLOW_SECRETS_DIR" ]; then
    for _f in "$SSLFLOW_SECRETS_DIR"/*; do
        [ -f "$_f" ] || continue
        _name=$(basename "$_f")
        case $_name in *[!A-Z0-9_]* | [0-9]*) continue ;; esac
        eval "_set=\${$_name:-}"
        [ -n "$_set" ] && continue
        _value=$(cat "$_f")
        export "$_name=$_value"
    done
    unset _f _name _set _value
fi

require() {  # require VAR...: every one set and not empty
    for _v in "$@"; do
        eval "_x=\${$_v:-}"
        if [ -z "$_x" ]; then echo "$0: $_v is not set (env file / Secret sslflow-secrets)" >&2; exit 2; fi
    done
    unset _v _x
}
