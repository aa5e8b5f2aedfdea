"""A weight sync stays quiet about what is expected (buffer-only layers, per-sync INFO lines) and loud about the
rest; the logger settings it changes are restored afterwards. (The real vLLM sync runs in test_rollout_vllm.)"""
import logging

from srpo_fast.rollout.vllm_engine import _RELOAD_LOGGER, quiet_expected_sync_logs


def test_expected_reload_warnings_are_dropped_and_real_ones_kept(caplog):
    reload_logger = logging.getLogger(_RELOAD_LOGGER)
    block_pool = logging.getLogger("vllm.v1.core.block_pool")
    # Whatever ran earlier in this process (vLLM's logging config, another library's dictConfig) may have stopped
    # these loggers propagating, raised their level or disabled them: capture on them directly, as a live run
    # with vLLM's default INFO logging would emit, and put every setting back afterwards.
    saved = {logger: (logger.level, logger.disabled, logger.propagate) for logger in (reload_logger, block_pool)}
    for logger in saved:
        logger.setLevel(logging.INFO)
        logger.disabled, logger.propagate = False, False
        logger.addHandler(caplog.handler)
    before = block_pool.level
    try:
        with caplog.at_level(logging.INFO):
            with quiet_expected_sync_logs():
                for layer in ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm", "QKVParallelLinear"):
                    reload_logger.warning("%s: Failed to load weights", layer)
                block_pool.info("Successfully reset prefix cache")
            block_pool.info("after the sync")
        restored = block_pool.level == before and not reload_logger.filters
    finally:
        for logger, (level, disabled, propagate) in saved.items():
            logger.removeHandler(caplog.handler)
            logger.setLevel(level)
            logger.disabled, logger.propagate = disabled, propagate
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["QKVParallelLinear: Failed to load weights", "after the sync"]
    assert restored
