//! `config check` and `config defaults`: configuration files.

use anyhow::Result;

use super::args::ConfigCommand;

pub(crate) fn config_cmd(c: ConfigCommand) -> Result<()> {
    use shardvol::config::Config;
    match c {
        ConfigCommand::Check { file } => {
            let cfg = Config::load(&file)?;
            eprintln!("{}: valid", file.display());
            print!("{}", cfg.to_toml());
        }
        ConfigCommand::Defaults => print!("{}", Config::default().to_toml()),
    }
    Ok(())
}
