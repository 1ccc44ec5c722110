"""The test suite's library: helpers that test modules share, imported one way everywhere
(`from support.<module> import name`; pyproject.toml puts tests/ on pytest's path). Fixtures stay in
tests/conftest.py, which pytest needs them in; their bodies call these. No test module imports
another test module or conftest (tests/test_tiers.py checks it).

    constants   REPO, RUN_TAG, GSM8K_DIR, TEST_SCALE, SERVER_TOKEN
    servers     local_server: every real server a test or benchmark starts on a free loopback port;
                killed_mid_push
    launcher    the launcher as tests run it: launch (wait), start_launch (background), warm_run,
                dry_run and the recipe's plan (RECIPE, recipe, plan_for)
    runs        a run directory: read_metrics, wait_for_step, run_log, fake_run
    processes   the processes of a test's run (run_processes, processes_mentioning, wait_gone, alive)
                and one_line_error
    models      tiny_corpus, lora_model, perturb
    reference   teacher-forced reference logprobs: hf_logprobs, peft_logprobs
    tiers       the three tiers (unit, integration, e2e): how a test gets one and the guards
"""
