fn main() {
    eprintln!("glm-run: the CLI arrives with the CLI issue");
    std::process::exit(2);
}
