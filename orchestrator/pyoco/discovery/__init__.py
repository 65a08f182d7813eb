"""Where tasks come from: a config's modules and packages, and entry-point plug-ins
(groups ``tokiwa.tasks`` and pyoco's ``pyoco.tasks``)."""
