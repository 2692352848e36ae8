#!/usr/bin/env bash
# Helpers shared by the launch scripts (sourced, not run).
# DRY_RUN=1 prints each command instead of running it.

# run CMD ARGS...: runs the command, or prints it (shell-quoted) when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# require NAME...: fails with a clear message if an environment variable is unset.
require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      echo "error: set ${name} (see launch/README.md)" >&2
      exit 2
    fi
  done
}

# set_config_flag: config_flag=(--config=$CONFIG), or no flag when CONFIG is unset: the
# trainer then resumes the run in WORKDIR with the config saved there (or asks for one).
# shellcheck disable=SC2034  # config_flag is read by the scripts that source this file
set_config_flag() {
  config_flag=()
  if [[ -n "${CONFIG:-}" ]]; then
    config_flag=(--config="${CONFIG}")
  else
    echo "CONFIG unset: resuming the run in ${WORKDIR} with the config saved there" \
      "(set CONFIG to start a new run)" >&2
  fi
}
