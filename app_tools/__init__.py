"""Tools over the Flower app as a whole, shared by the hospital's and the operator's commands.

`app_tools.run_config` resolves the run config as Flower does (pyproject defaults + `--run-config`);
`app_tools.bundle` reads app bundles (FABs) and their approval records. Unlike `common/`, this
package may import Flower; `client/` and `server/` may both import it (neither imports the other).
The ServerApp and ClientApp do not import it; it ships in the FAB so that the bundle's own tools
(`client.check_data`, `client.approve_app`, `server.plan`) import from inside it.
"""
