"""Suite-wide fixtures and hooks.

Fixtures that need real daemons live in ``tests/fixtures/`` and are imported
here so that every tier can use them.  A daemon that will not start fails the
run: nothing is skipped silently.
"""

import pytest

from tests.fixtures.hub import hub  # noqa: F401  (fixture)
from tests.fixtures.ldap import ldap_directory  # noqa: F401  (fixture)
from tests.fixtures.netns import client_netns, nat_project, node_agent  # noqa: F401  (fixtures)
from tests.fixtures.postgres import postgres  # noqa: F401  (fixture)
from tests.fixtures.lxd2 import second_lxd  # noqa: F401  (fixture)
from tests.fixtures.lxd import (  # noqa: F401  (fixtures)
    idmap_blocks, logs_on_failure, lxd, pinned_nics, run_tag, template_image, user_containers,
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item, so fixtures can tell at teardown
    # whether the test failed (and print container logs then).
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
