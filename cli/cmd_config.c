/* hilal config: print the effective configuration. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static void help(void)
{
    printf("Usage: hilal [--config FILE] [--set K=V]... config [--plain] [--key SECTION.KEY]\n"
           "\n"
           "Prints the effective configuration as a configuration file: every key\n"
           "with its value, type, range, unit, default and help, and where the\n"
           "value came from (default, FILE:LINE or --set). The output is itself a\n"
           "valid configuration file.\n"
           "\n"
           "  --plain          values only, no comments\n"
           "  --no-origin      comments but not where values came from (this is how\n"
           "                   configs/hilal.conf, the commented defaults, is made)\n"
           "  --key K          print only the value of one key\n"
           "  --config FILE, --set K=V  as the global options\n");
}

int hilal_cli_config(int argc, char **argv, hilal_cli *cli)
{
    int plain = 0;
    const char *key = NULL;
    for (int i = 1; i < argc; i++) {
        int used = hilal_cli_config_option(cli, argc, argv, &i);
        if (used < 0)
            return HILAL_EXIT_CONFIG;
        if (used > 0)
            continue;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            help();
            return HILAL_EXIT_OK;
        } else if (!strcmp(argv[i], "--plain")) {
            plain = 1;
        } else if (!strcmp(argv[i], "--no-origin")) {
            plain = 2;
        } else if (!strcmp(argv[i], "--key") && i + 1 < argc) {
            key = argv[++i];
        } else {
            fprintf(stderr, "hilal config: usage error: unexpected argument '%s'; see `hilal config --help`\n",
                    argv[i]);
            return HILAL_EXIT_USAGE;
        }
    }
    if (key != NULL) {
        const hilal_param *p = hilal_config_param(cli->cfg, key);
        if (p == NULL) {
            const char *near = hilal_config_suggest(cli->cfg, key);
            fprintf(stderr, "hilal: configuration error: unknown key '%s'%s%s%s\n", key,
                    near ? "; did you mean '" : "", near ? near : "", near ? "'?" : "");
            return HILAL_EXIT_CONFIG;
        }
        printf("%s = %s    # from %s\n", key, hilal_config_value(cli->cfg, key),
               hilal_config_origin(cli->cfg, key));
        return HILAL_EXIT_OK;
    }
    char *text = hilal_config_text(cli->cfg, plain == 1 ? -1 : plain == 2 ? 0 : 1);
    if (text == NULL) {
        fprintf(stderr, "hilal: out of memory\n");
        return HILAL_EXIT_CANNOT_RUN;
    }
    fputs(text, stdout);
    free(text);
    return HILAL_EXIT_OK;
}
